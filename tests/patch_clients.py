"""Unmodified client code (Hugging Face Trainer, timm, plain PyTorch) run twice from the same seed,
without and with labelsmooth_ext.patch(). Run by tests/test_patch.py in a subprocess (with a
timeout); prints one JSON line with the losses, the max |weight difference| and the operators the
profiler saw in the patched run.

    python tests/patch_clients.py {transformers,timm,torch,all}

("all": the three in one process, one JSON object keyed by client; the tests use this, since
importing torch, transformers and timm costs more than the runs.)

Offline: models are built from configs with random weights, data is made here.
"""
import json
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import labelsmooth_ext  # noqa: E402


class Phase:
    """Profiles a phase of the client; .ops are our operators that ran in it."""

    def __enter__(self):
        self._prof = profile(activities=[ProfilerActivity.CPU])
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        self.ops = sorted({e.key for e in self._prof.key_averages()
                           if e.key.startswith("labelsmooth_ext::")})
        return False


def _weight_diffs(a, b):
    """max |a - b| over all entries, and the largest per-tensor max |a - b| / max |a|."""
    abs_d = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    rel_d = max(float((a[k].double() - b[k].double()).abs().max())
                / max(float(a[k].double().abs().max()), 1e-30) for k in a)
    return abs_d, rel_d


# The float32 noise floor of a run: the unpatched run again with its loss scaled by 1 + 2**-22
# (about 2 float32 ulps) before backward. Training amplifies rounding differences; patched vs
# unpatched is compared with this.
NOISE_SCALE = 1.0 + 2.0 ** -22


def _run_twice(train_once, control=True):
    """train_once(loss_scale) -> (losses, state_dict, extra, ops per phase): unpatched, then
    patched, then (control) unpatched with the loss scaled by NOISE_SCALE."""
    assert not labelsmooth_ext.patched()
    base_losses, base_state, base_extra, base_ops = train_once(1.0)
    with labelsmooth_ext.patch() as handle:
        ours_losses, ours_state, ours_extra, ours_ops = train_once(1.0)
    assert not labelsmooth_ext.patched(), "the handle's undo left patches behind"
    abs_w, rel_w = _weight_diffs(base_state, ours_state)
    noise = {}
    if control:
        ctl_losses, ctl_state, _, _ = train_once(NOISE_SCALE)
        noise = {"noise_max_abs_loss_diff": max(abs(a - b) for a, b in zip(base_losses, ctl_losses)),
                 "noise_max_abs_weight_diff": _weight_diffs(base_state, ctl_state)[0]}
    return {**noise,
        "patched": list(handle.names),
        "ops_unpatched": base_ops,
        "ops_patched": ours_ops,
        "losses_unpatched": base_losses,
        "losses_patched": ours_losses,
        "max_abs_loss_diff": max(abs(a - b) for a, b in zip(base_losses, ours_losses)),
        "max_abs_weight_diff": abs_w,
        "max_rel_weight_diff": rel_w,
        "extra_unpatched": base_extra,
        "extra_patched": ours_extra,
    }


# --------------------------------------------------------------------------------------------
def transformers_client():
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    vocab, seq, n_examples = 1000, 32, 16

    g = torch.Generator().manual_seed(1)
    examples = []
    for _ in range(n_examples):
        ids = torch.randint(0, vocab, (seq,), generator=g)
        labels = ids.clone()
        pad = int(torch.randint(0, seq // 2, (1,), generator=g))  # right padding, labels -100
        attention = torch.ones(seq, dtype=torch.long)
        if pad:
            labels[-pad:] = -100
            attention[-pad:] = 0
        examples.append({"input_ids": ids, "attention_mask": attention, "labels": labels})

    class RecordingTrainer(Trainer):
        """Trainer that also records the exact loss of each step (the logged one is rounded)."""

        recorded = None

        loss_scale = 1.0

        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            assert not isinstance(loss, tuple)
            self.recorded.append(float(loss.detach()))
            return loss * self.loss_scale if self.loss_scale != 1.0 else loss

    def train_once(loss_scale):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64)
        model = LlamaForCausalLM(config)
        with tempfile.TemporaryDirectory() as out:
            args = TrainingArguments(output_dir=out, max_steps=3, per_device_train_batch_size=4,
                                     learning_rate=1e-3, label_smoothing_factor=0.1, seed=0,
                                     logging_strategy="no", save_strategy="no", report_to=[],
                                     use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
            trainer = RecordingTrainer(model=model, args=args, train_dataset=examples)
            trainer.recorded, trainer.loss_scale = [], loss_scale
            with Phase() as train_phase:
                trainer.train()
        # the model's own loss (labels=), no Trainer: ForCausalLMLoss -> fixed_cross_entropy
        model.eval()
        batch = {k: torch.stack([e[k] for e in examples[:4]]) for k in examples[0]}
        with torch.no_grad(), Phase() as own_phase:
            own = float(model(**batch).loss)
        return (trainer.recorded, {k: v.detach().clone() for k, v in model.state_dict().items()},
                {"model_labels_loss": own},
                {"trainer_label_smoothing": train_phase.ops, "model_labels_loss": own_phase.ops})

    result = _run_twice(train_once)

    # the model's own labels= loss on one model (same weights), without and with the patch
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=64))
    batch = {k: torch.stack([e[k] for e in examples[:4]]) for k in examples[0]}

    def own_loss():
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}

    base_loss, base_grads = own_loss()
    with labelsmooth_ext.patch(), Phase() as phase:
        ours_loss, ours_grads = own_loss()
    result["model_labels_same_weights"] = {
        "loss_unpatched": base_loss, "loss_patched": ours_loss, "ops_patched": phase.ops,
        "max_abs_loss_diff": abs(base_loss - ours_loss),
        "max_abs_grad_diff": _weight_diffs(base_grads, ours_grads)[0]}
    result["max_abs_model_labels_loss_diff"] = abs(result["extra_unpatched"]["model_labels_loss"]
                                                   - result["extra_patched"]["model_labels_loss"])
    return result


# --------------------------------------------------------------------------------------------
def timm_client():
    import timm
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    num_classes, batch = 10, 8
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, batch, 3, 32, 32, generator=g)
    labels = torch.randint(0, num_classes, (3, batch), generator=g)

    def train_once(criterion_name, dtype, loss_scale):
        torch.manual_seed(0)
        model = timm.create_model("resnet10t", pretrained=False, num_classes=num_classes).to(dtype)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if criterion_name == "label_smoothing":
            criterion, mixup = LabelSmoothingCrossEntropy(smoothing=0.1), None
        else:
            criterion = SoftTargetCrossEntropy()
            mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1,
                          num_classes=num_classes)
        np_state = __import__("numpy").random.get_state()
        __import__("numpy").random.seed(0)  # Mixup draws lambda with numpy
        __import__("random").seed(0)
        losses = []
        with Phase() as phase:
            for step in range(3):
                # copies: Mixup mixes the batch in place
                x, y = images[step].to(dtype, copy=True), labels[step].clone()
                if mixup is not None:
                    x, y = mixup(x, y)  # y: soft targets (mixup / cutmix mixed, smoothed)
                    y = y.to(dtype)
                loss = criterion(model(x), y)
                opt.zero_grad()
                (loss * loss_scale if loss_scale != 1.0 else loss).backward()
                opt.step()
                losses.append(float(loss.detach()))
        __import__("numpy").random.set_state(np_state)
        return (losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, {},
                {"train": phase.ops})

    return {f"{name}_{dt}": _run_twice(lambda scale, name=name, dt=dt: train_once(name, getattr(torch, dt), scale),
                                       control=dt == "float32")
            for name in ("label_smoothing", "soft_target_mixup") for dt in ("float32", "float64")}


# --------------------------------------------------------------------------------------------
def torch_client():
    """A plain script: nn.CrossEntropyLoss(label_smoothing=0.1) created before patch()."""
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1, ignore_index=-100)

    def train_once(loss_scale):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 50))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1)
        losses = []
        with Phase() as phase:
            for _ in range(3):
                x = torch.randn(32, 20, generator=g)
                y = torch.randint(0, 50, (32,), generator=g)
                y[::7] = -100
                loss = criterion(model(x), y)
                opt.zero_grad()
                (loss * loss_scale if loss_scale != 1.0 else loss).backward()
                opt.step()
                losses.append(float(loss.detach()))
        return (losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, {},
                {"train": phase.ops})

    return _run_twice(train_once)


if __name__ == "__main__":
    torch.set_num_threads(1)
    clients = {"torch": torch_client, "timm": timm_client, "transformers": transformers_client}
    needs = {"torch": (), "timm": ("timm",), "transformers": ("transformers", "accelerate")}
    import importlib.util

    out = {}
    for name in (clients if sys.argv[1] == "all" else [sys.argv[1]]):
        missing = [m for m in needs[name] if importlib.util.find_spec(m) is None]
        out[name] = {"skipped": f"{', '.join(missing)} not installed"} if missing else clients[name]()
    print("RESULT " + json.dumps(out if sys.argv[1] == "all" else out[sys.argv[1]]), flush=True)
