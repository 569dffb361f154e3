"""Framework callbacks on real Trainers with tiny random models (no downloads)."""

from __future__ import annotations

import sys

import pytest
import torch

from opaudit.data.report import load
from opaudit.integrations.steps import IntegrationError


def _dispatch_modes() -> int:
    return torch._C._len_torch_dispatch_stack()


def test_importing_the_integrations_imports_no_framework():
    import subprocess

    code = ("import sys, opaudit.integrations; "
            "print(any(m in sys.modules for m in ('transformers', 'lightning', 'pytorch_lightning')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_hugging_face_trainer_records_the_window_and_trains_on(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from opaudit.integrations import HuggingFaceCallback

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    ids = torch.randint(0, 64, (16, 8))
    data = [{"input_ids": x, "labels": x} for x in ids]
    out = tmp_path / "audit.yaml"
    callback = HuggingFaceCallback(out, start_step=2, steps=2, reps=1)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=2,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    assert trainer.state.global_step == 6  # training went on after the window
    assert _dispatch_modes() == 0
    report = load(str(out))
    assert report.settings["recorded"] == "steps 3-4" and report.settings["integration"] == "transformers"
    phases = {p for f in report.all_findings for p in f.phases}
    assert {"forward", "backward", "optimizer"} <= phases
    # Two steps: each forward op of the model ran twice.
    (emb,) = [f for f in report.all_findings if f.op == "aten.embedding.default" and "f32[64,16]" in f.signature]
    assert emb.calls == 2
    trainer.save_model(str(tmp_path / "saved"))  # the user's own saving still works afterwards
    assert (tmp_path / "saved" / "config.json").exists()


def test_lightning_fit_records_the_window(tmp_path):
    import lightning as L

    from opaudit.integrations import LightningCallback

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    torch.manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randn(64, 1))
    out = tmp_path / "audit.json"
    trainer = L.Trainer(max_steps=5, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[LightningCallback(out, start_step=1, steps=2, reps=1)])
    trainer.fit(Tiny(), torch.utils.data.DataLoader(ds, batch_size=8))
    assert trainer.global_step == 5
    assert _dispatch_modes() == 0
    report = load(str(out))
    assert report.settings["recorded"] == "steps 2-3" and report.settings["integration"] == "lightning"
    (addmm,) = [f for f in report.all_findings if f.op == "aten.addmm.default" and "f32[8,8]" in f.signature]
    assert addmm.calls == 2 and addmm.sites[0].function == "training_step"
    assert any("optimizer" in f.phases for f in report.all_findings)


def test_a_window_past_the_end_of_training_warns_and_writes_nothing(tmp_path):
    from opaudit.integrations import StepAudit

    audit = StepAudit(tmp_path / "a.yaml", start_step=10)
    for step in range(3):
        audit.step_begins(step)
        audit.step_ends(step + 1)
    with pytest.warns(RuntimeWarning, match="before start step 10: nothing was recorded"):
        audit.training_ends(3)
    assert not (tmp_path / "a.yaml").exists()


@pytest.mark.parametrize("where, message", [
    ("missing/audit.yaml", "folder {tmp}/missing does not exist"),
    (".", "{tmp}: it is a directory"),
])
def test_an_unwritable_output_is_refused_before_training(tmp_path, where, message):
    from opaudit.integrations import HuggingFaceCallback, LightningCallback

    for cls in (HuggingFaceCallback, LightningCallback):
        with pytest.raises(IntegrationError) as e:
            cls(tmp_path / where)
        text = str(e.value)
        assert "\n" not in text and text.endswith(message.format(tmp=tmp_path))


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps must be a positive integer, got 0"),
    ({"start_step": -1}, "start step must be 0 or more, got -1"),
    ({"format": "xml"}, "unknown format 'xml'"),
])
def test_bad_windows_and_formats_are_refused(tmp_path, kwargs, message):
    from opaudit.integrations import StepAudit

    with pytest.raises(IntegrationError, match=message):
        StepAudit(tmp_path / "a.yaml", **kwargs)
