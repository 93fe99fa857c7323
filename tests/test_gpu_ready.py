"""What a GPU needs, proven on the CPU: the host never waits inside a training step, and the models
compile without graph breaks.

A host sync is an op whose result the host must read before it can go on: `.item()` and `int()`
of a tensor (aten._local_scalar_dense), `.tolist()`, nonzero, boolean-mask indexing, unique and
the like. On a CPU they cost nothing, on a GPU each one stalls the queue of kernels until the GPU
has caught up. The counter below records every one of them that runs, on any device, so a sync
added to a method, a loader or the loop fails these tests on a machine without a GPU."""

import collections
import traceback

import pytest
import torch
import torch._dynamo
from torch.utils._python_dispatch import TorchDispatchMode

import cli
import common
import data_sets

METHODS = sorted(cli.METHODS)
SYNC_OPS = {
    "_local_scalar_dense",  # .item(), int(t), float(t), bool(t), a 0-d tensor as an index
    "nonzero",
    "masked_select",
    "_unique",
    "_unique2",
    "unique_consecutive",
    "unique_dim",
    "is_nonzero",
    "equal",
}


class SyncCounter(TorchDispatchMode):
    """Records each host sync run under it, with the line of our code that ran it: the ops above,
    an index or index_put with a boolean mask, repeat_interleave without output_size, and
    Tensor.tolist (which does not dispatch an op, so it is wrapped while the counter runs)."""

    def __init__(self):
        super().__init__()
        self.found = []
        self.active = True  # recording

    def record(self, name):
        if not self.active:
            return
        ours = [f for f in traceback.extract_stack()[:-2] if "site-packages" not in f.filename]
        where = f"{ours[-1].name} ({ours[-1].filename}:{ours[-1].lineno})" if ours else ""
        self.found.append((name, where))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        masks = [a for a in (args[1] if name in ("index", "index_put", "index_put_") else [])]
        boolean = any(isinstance(m, torch.Tensor) and m.dtype == torch.bool for m in masks)
        sized = "output_size" in (kwargs or {}) or len(args) > 3
        if name in SYNC_OPS or boolean or (name == "repeat_interleave" and not sized):
            self.record(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        tolist = torch.Tensor.tolist

        def counted(tensor):
            self.record("tolist")
            return tolist(tensor)

        self.tolist = tolist
        torch.Tensor.tolist = counted
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self.tolist
        return super().__exit__(*exc)


def tiny(method, **overrides):
    module, model_cls = cli.METHODS[method]
    cfg, _ = cli.resolve(module, "tiny", None, overrides)
    torch.manual_seed(0)
    return module, model_cls(cfg), cfg


def batch_inputs(module, cfg, batch_size=4):
    """The method's inputs of a batch as the loader draws them, and the batch's labels."""
    keys = data_sets.sample_keys(0, 0, torch.arange(batch_size))
    inputs = module.sample_inputs(cfg, data_sets.Draws(keys, first=1))
    return inputs, torch.arange(batch_size) % 3


def test_the_counter_catches_syncs():
    x = torch.arange(6.0)
    for sync in (
        lambda: x.sum().item(),
        lambda: int(x[0]),
        lambda: x[torch.tensor(2)],  # a 0-d tensor as an index: its value is read
        lambda: x[x > 2],
        lambda: x.nonzero(),
        lambda: x.tolist(),
        lambda: torch.repeat_interleave(torch.tensor([1, 2])),
    ):
        with SyncCounter() as counter:
            sync()
        assert len(counter.found) >= 1
    with SyncCounter() as counter:
        y = x[torch.tensor([2])]  # a 1-element tensor index: no read
        torch.where(x > 2, x, 0.0).sum()
    assert counter.found == [] and y.shape == (1,)


@pytest.mark.parametrize("method", METHODS)
def test_no_host_sync_in_a_methods_inputs_forward_backward_and_optimizer_step(method):
    module, model, cfg = tiny(method, drop_path=0.1)  # drop path too: it draws in the step
    optimizer = torch.optim.AdamW(common.param_groups(model, 0.05), fused=True)  # as on a GPU
    imgs = torch.randn(4, cfg.in_chans, cfg.img_size, cfg.img_size)
    with SyncCounter() as counter:
        inputs, labels = batch_inputs(module, cfg)
        if "labels" in model.forward.__code__.co_varnames:
            inputs["labels"] = labels
        loss = model(imgs, **inputs)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert counter.found == [], f"{method}: {counter.found}"


def test_the_loop_syncs_only_at_logged_steps(tmp_path):
    """A run of 9 steps logged every 3rd (8 an epoch), through the command line in this process,
    counted from its first optimiser step on: the host reads a value only in interval_mean (the
    loss and the stop flag of a logged step), evaluate_loss (the held-out loss, at the epoch's
    end), the sampler's permutation of the next epoch (a CPU tensor by design) and the saves;
    between logged steps, in the loader, the methods' inputs, the forward, backward and optimiser
    step, nothing."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    args = ["pretrain", "pr-mim", "--preset", "tiny", "--max-steps", 9, "--log-every", 3]
    args += ["--out", tmp_path / "run", "--drop-path", 0.1]
    with SyncCounter() as counter:
        counter.active = False  # the set-up (the model, the data read once) is not a step

        def start(optimizer, args, kwargs):
            counter.active = True

        hook = register_optimizer_step_post_hook(start)
        try:
            with pytest.raises(SystemExit) as e:
                cli.main(list(map(str, args)))
        finally:
            hook.remove()
    assert e.value.code == 0
    allowed = ("interval_mean", "evaluate_loss", "__iter__", "save_checkpoint", "git_hash")
    where = collections.Counter(w.split(" ")[0] for _, w in counter.found)
    assert set(where) <= set(allowed), counter.found
    assert where["interval_mean"] == 4  # steps 3, 6, 8 (an epoch's end, before its save) and 9
    sampler = [w for _, w in counter.found if w.startswith("__iter__")]
    assert all("loaders.py" in w for w in sampler), sampler


def explained(method, **overrides):
    module, model, cfg = tiny(method, **overrides)
    imgs = torch.randn(4, cfg.in_chans, cfg.img_size, cfg.img_size)
    inputs, labels = batch_inputs(module, cfg)
    if "labels" in model.forward.__code__.co_varnames:
        inputs["labels"] = labels

    def step(imgs, inputs):  # a training step's forward; the backward follows the graph
        return model(imgs, **inputs)[0]

    torch._dynamo.reset()
    return torch._dynamo.explain(step)(imgs, inputs)


@pytest.mark.parametrize("method", ["mae", "simmim", "pr-mim", "i-mae"])
def test_the_methods_compile_whole(method):
    explanation = explained(method)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow  # 30 s: the reversible columns are traced with their backward
def test_revcolv2_compiles_whole_plain_and_in_pieces_reversible():
    """The plain path has no graph break. The reversible one breaks around each column: its
    autograd.Function's backward calls torch.autograd.grad on the recomputed levels, which Dynamo
    does not trace (docs/revcolv2.md)."""
    assert explained("revcolv2", reversible=False).graph_break_count == 0
    reversible = explained("revcolv2")
    reasons = {str(b.reason).split("\n")[0] for b in reversible.break_reasons}
    assert reversible.graph_break_count <= 2 * (4 + 4), reasons  # the tiny preset: 2 + 2 columns
    assert all("autograd.grad" in r or "autograd" in r for r in reasons), reasons
