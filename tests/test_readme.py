"""Every Python snippet of the README runs exactly as written (each in a fresh scope)."""

import re
from pathlib import Path

import torch
import torch.nn.functional as F

import dassdp

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def run_block(index: int) -> dict:
    scope: dict = {}
    exec(compile(python_blocks()[index], f"{README}:python block {index}", "exec"), scope)
    return scope


def test_readme_opens_with_the_two_commands():
    first = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1)
    assert [line.split("#")[0].strip() for line in first.strip().splitlines()] == [
        "make demo",
        "make test",
    ]


def test_every_python_block_is_tested():
    heads = [block.strip().splitlines()[0] for block in python_blocks()]
    assert len(heads) == 3, heads  # library use, any model, Lightning: one test each below


def test_readme_library_example_runs_and_learns():
    code = python_blocks()[0]
    assert len(code.strip().splitlines()) < 10
    plast = run_block(0)["plast"]
    assert plast.counters["applied"] == 3  # epoch 1 applies the fitted gate on 3 steps
    assert all(fit["records"] == 3 * 32 for fit in plast.gate_summary().values())
    assert all(m["dw_abs_mean"] > 0 for m in plast.last_metrics().values())


def test_readme_any_model_example_runs_with_the_readme_loop():
    scope = run_block(1)
    model, plast = scope["model"], scope["plast"]
    plast.config = plast.config.replace(warmup_epochs=1)  # reach the update in two epochs
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(0)
    w = model.fc2.weight.detach().clone()
    for epoch in range(2):
        plast.set_epoch(epoch)
        for _ in range(2):  # init_hidden=True: the 2nd backward needs dassdp.reset's snnTorch reset
            x, y = torch.rand(5, 8, 20) * 2, torch.randint(0, 4, (8,))  # [T, B, 20]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            plast.step(loss)
            dassdp.reset(model)
    assert plast.counters["applied"] == 2 and plast.stats["fc2"].n == 2 * 8
    assert set(plast.last_metrics()) == {"fc1", "fc2"} and not torch.equal(model.fc2.weight, w)


def test_readme_lightning_example_runs():
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from snn_fixtures import TinySNN

    scope = run_block(2)

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = TinySNN()

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.model(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    data = DataLoader(TensorDataset(torch.randn(16, 12), torch.randint(0, 4, (16,))), batch_size=8)
    scope["trainer"].fit(Lit(), data)
    learner = scope["callback"].learner
    assert learner.counters["applied"] == 2 and learner.fits is not None
