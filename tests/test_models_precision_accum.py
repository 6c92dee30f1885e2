"""open_clip's model flags: --pretrained, LiT locking, --grad-checkpointing, every --precision mode, --siglip
(loss, init, tokenizer, the sigmoid per-sample loss of small_loss/big_loss) and --accum-freq composed with
selection (exact accumulation, history updated for every batch)."""

import math

import pytest
import torch
from tiny_run import tiny_trainer

from dissect_fast.config import PRECISIONS, ConfigError, config_from_args
from dissect_fast.model import autocast, input_dtype, uses_grad_scaler, weight_dtype
from dissect_fast.training.checkpoint import load_checkpoint
from dissect_fast.training.loop import Trainer


def make(tiny_data, logs, name, *extra, model="micro-vit", batch=16):
    """A 1-epoch Trainer (``tiny_run``)."""
    return tiny_trainer(logs, name, *extra, data=tiny_data, model=model, batch=batch, epochs=1)


def first_batch(t: Trainer):
    return next(iter(t.train_loader))


def snapshot(model: torch.nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------ --precision


def test_precision_values_parse_and_map(tiny_data, capsys):
    base = ["--train-data", str(tiny_data / "train"), "--model", "micro-vit"]
    for p in PRECISIONS:
        cfg = config_from_args(base + ["--precision", p])
        assert cfg.model.precision == ("amp_bf16" if p == "amp_bfloat16" else p)
    with pytest.raises(SystemExit):
        config_from_args(base + ["--precision", "bf32"])
    assert "--precision must be one of" in capsys.readouterr().err
    # open_clip's meaning of each mode: weight dtype = input dtype, autocast only for amp*, a scaler only for amp
    assert weight_dtype("bf16") == weight_dtype("pure_bf16") == input_dtype("bf16") == torch.bfloat16
    assert weight_dtype("fp16") == weight_dtype("pure_fp16") == input_dtype("pure_fp16") == torch.float16
    for p in ("fp32", "amp", "amp_bf16"):
        assert weight_dtype(p) is None and input_dtype(p) is None
    assert [p for p in PRECISIONS if uses_grad_scaler(p)] == ["amp"]
    cpu = torch.device("cpu")
    assert isinstance(autocast("amp_bf16", cpu), torch.autocast) and isinstance(autocast("amp", cpu), torch.autocast)
    for p in ("fp32", "bf16", "pure_bf16", "fp16", "pure_fp16"):
        assert not isinstance(autocast(p, cpu), torch.autocast)


def test_bf16_weights_train_and_evaluate_on_cpu(tiny_data, tmp_path):
    """--precision bf16 is open_clip's: weights in bf16 (LayerNorms float32), bf16 inputs, no autocast; it is no
    longer mapped to amp_bf16. A 1-epoch run with a scoring strategy trains and evaluates."""
    t = make(
        tiny_data,
        tmp_path,
        "bf16",
        "--precision",
        "bf16",
        "--val-data",
        str(tiny_data / "val"),
        "--select-strategy",
        "clipscore",
        "--select-rate",
        "0.5",
        "--train-num-samples",
        "64",
    )
    assert t.precision == "bf16" and not t.scaler.is_enabled()
    assert t.model.visual.conv1.weight.dtype == torch.bfloat16
    assert t.model.visual.ln_pre.weight.dtype == torch.float32
    before = snapshot(t.model)
    m = t.fit()[-1]
    assert math.isfinite(m["train_loss"]) and "val/image_to_text_R@1" in m
    assert not torch.equal(before["visual.conv1.weight"], t.model.visual.conv1.weight)


@pytest.mark.parametrize("precision,dtype", [("pure_bf16", torch.bfloat16), ("pure_fp16", torch.float16)])
def test_pure_low_precision_step_on_cpu(tiny_data, tmp_path, precision, dtype):
    t = make(tiny_data, tmp_path, precision, "--precision", precision)
    assert {p.dtype for p in t.model.parameters()} == {dtype}
    before = snapshot(t.model)
    loss = t.train_step(0, *first_batch(t))
    assert loss.dtype == dtype and torch.isfinite(loss)
    assert any(not torch.equal(before[n], p) for n, p in t.model.named_parameters())


# ------------------------------------------------------------------ --pretrained


def test_pretrained_checkpoint_gives_the_initial_weights(tiny_data, tmp_path):
    t1 = make(tiny_data, tmp_path, "src", "--train-num-samples", "64")
    t1.fit()
    ck_path = tmp_path / "src" / "checkpoints" / "epoch_1.pt"
    ref = load_checkpoint(str(ck_path))["state_dict"]
    t2 = make(tiny_data, tmp_path, "ft", "--pretrained", str(ck_path), "--seed", "5")
    for k, v in t2.model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    # open_clip's format: DDP prefixes in a "state_dict", or a bare state dict
    torch.save({"state_dict": {"module." + k: v for k, v in ref.items()}, "epoch": 1}, tmp_path / "oc.pt")
    t3 = make(tiny_data, tmp_path, "ft2", "--pretrained", str(tmp_path / "oc.pt"), "--seed", "6")
    assert all(torch.equal(v, ref[k]) for k, v in t3.model.state_dict().items())


def test_pretrained_errors_name_the_flag(tiny_data, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="--pretrained .*missing.pt: no such checkpoint file"):  # preflight
        make(tiny_data, tmp_path, "x", "--pretrained", str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="--pretrained laion400m_e32: neither a file nor an open_clip pretrained tag"):
        make(tiny_data, tmp_path, "y", "--pretrained", "laion400m_e32")
    # a checkpoint of another model is refused, naming the model it holds
    t = make(tiny_data, tmp_path, "rn", model="micro-rn")
    torch.save({"state_dict": t.model.state_dict(), "model_name": "micro-rn"}, tmp_path / "rn.pt")
    with pytest.raises(ValueError, match="holds a 'micro-rn' model"):
        make(tiny_data, tmp_path, "z", "--pretrained", str(tmp_path / "rn.pt"))
    # an open_clip tag whose weights are not cached: offline, a clear error naming the tag and HF_HUB_OFFLINE
    import huggingface_hub.constants as hc

    from dissect_fast.model import resolve_pretrained

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(ValueError, match=r"open_clip tag 'laion2b_s34b_b79k' .*HF_HUB_OFFLINE"):
        resolve_pretrained("laion2b_s34b_b79k", "ViT-B-32")


# ------------------------------------------------------------------ locking


def test_lock_towers_freeze_and_optimizer_holds_trainable_only(tiny_data, tmp_path):
    t = make(
        tiny_data,
        tmp_path,
        "lit",
        "--lock-image",
        "--lock-image-unlocked-groups",
        "1",
        "--lock-text",
        "--lock-text-unlocked-layers",
        "1",
    )
    named = dict(t.model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    # image: the last group (proj) trains; text: the last group (projection) and, without
    # --lock-text-freeze-layer-norm, the text LayerNorms (open_clip's meaning of the flag)
    assert "visual.proj" in trainable and "visual.conv1.weight" not in trainable
    assert "text_projection" in trainable and "token_embedding.weight" not in trainable
    assert "ln_final.weight" in trainable and "transformer.resblocks.0.ln_1.weight" in trainable
    assert "transformer.resblocks.0.attn.in_proj_weight" not in trainable
    in_opt = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert in_opt == {id(named[n]) for n in trainable}
    before = snapshot(t.model)
    t.train_step(0, *first_batch(t))
    for n, p in named.items():
        changed = not torch.equal(before[n], p)
        assert changed == (n in trainable), n

    t2 = make(tiny_data, tmp_path, "lit2", "--lock-text", "--lock-text-freeze-layer-norm")
    frozen = {n for n, p in t2.model.named_parameters() if not p.requires_grad}
    assert "ln_final.weight" in frozen and "transformer.resblocks.0.ln_1.weight" in frozen
    assert not any(n.startswith("visual.") for n in frozen)


def test_lock_resnet_bn_stats_and_partial_lock_error(tiny_data, tmp_path, capsys):
    t = make(tiny_data, tmp_path, "rnlock", "--lock-image", "--lock-image-freeze-bn-stats", model="micro-rn")
    bns = [m for m in t.model.visual.modules() if type(m).__name__ == "FrozenBatchNorm2d"]
    assert bns and not any(isinstance(m, torch.nn.BatchNorm2d) for m in t.model.visual.modules())
    stats = {n: b.clone() for n, b in t.model.visual.named_buffers()}
    t.train_step(0, *first_batch(t))
    assert all(torch.equal(b, stats[n]) for n, b in t.model.visual.named_buffers())
    with pytest.raises(ValueError, match="--lock-image-unlocked-groups 1: open_clip locks a ModifiedResNet"):
        make(tiny_data, tmp_path, "rnpart", "--lock-image", "--lock-image-unlocked-groups", "1", model="micro-rn")
    with pytest.raises(SystemExit):
        make(tiny_data, tmp_path, "nolock", "--lock-text-unlocked-layers", "2")
    assert "add --lock-text" in capsys.readouterr().err


# ------------------------------------------------------------------ --grad-checkpointing


def test_grad_checkpointing_same_loss_and_gradients(tiny_data, tmp_path):
    sel = ["--select-strategy", "clipscore", "--select-rate", "0.5", "--seed", "3"]
    a = make(tiny_data, tmp_path, "plain", *sel)
    b = make(tiny_data, tmp_path, "ckpt", *sel, "--grad-checkpointing")
    assert b.model.transformer.grad_checkpointing and b.model.visual.transformer.grad_checkpointing
    batch = first_batch(a)
    la, lb = a.train_step(0, *batch), b.train_step(0, *batch)
    assert torch.allclose(la, lb, rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), n


# ------------------------------------------------------------------ --siglip


def test_sigmoid_per_sample_loss_matches_hand_computation():
    from open_clip.loss import SigLipLoss

    from dissect_fast.selection.strategies import SmallLoss, per_sample_sigmoid_loss

    g = torch.Generator().manual_seed(0)
    f, t = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    scale, bias = torch.tensor(3.0), torch.tensor(-1.5)
    got = per_sample_sigmoid_loss(f, t, scale, bias)
    fn, tn = torch.nn.functional.normalize(f, dim=-1), torch.nn.functional.normalize(t, dim=-1)
    for i in range(5):
        want = 0.0
        for j in range(5):
            z = 1.0 if i == j else -1.0
            logit = 3.0 * float(fn[i] @ tn[j]) - 1.5
            want -= math.log(1.0 / (1.0 + math.exp(-z * logit)))
        assert abs(float(got[i]) - want) < 1e-5
    # the rows add up to open_clip's SigLipLoss (normalised by the batch size)
    assert torch.allclose(got.sum() / 5, SigLipLoss()(fn, tn, scale, bias), atol=1e-5)
    # small_loss under --siglip keeps the k smallest sigmoid losses
    from dissect_fast.config import SelectConfig

    s = SmallLoss(2, 5, 5, torch.device("cpu"), SelectConfig(strategy="small_loss", rate=0.4))
    s.sigmoid_bias = bias
    sel = s.select(0, torch.arange(5), (f, t), scale, 100.0, None)
    assert sel.index.tolist() == torch.argsort(got)[:2].tolist()


def test_siglip_run_uses_sigmoid_loss_and_init(tiny_data, tmp_path):
    from open_clip.loss import SigLipLoss

    t = make(
        tiny_data,
        tmp_path,
        "siglip",
        "--siglip",
        "--select-strategy",
        "big_loss",
        "--select-rate",
        "0.5",
        "--train-num-samples",
        "64",
    )
    assert isinstance(t.loss_fn, SigLipLoss) and t.tokenizer is None  # micro-vit tokenises with CLIP BPE
    scale, bias = t.model.logit_scale.detach(), t.model.logit_bias.detach()
    assert abs(float(scale) - math.log(10)) < 1e-6 and float(bias) == -10.0
    assert t.strategy.sigmoid_bias is not None and t.strategy.sigmoid_bias.data_ptr() == t.model.logit_bias.data_ptr()
    m = t.fit()[-1]
    assert math.isfinite(m["train_loss"]) and float(bias) != -10.0  # a view: the trained bias
    from dissect_fast.model import model_from_checkpoint  # the CLI tools load a --siglip checkpoint (logit bias)

    loaded = model_from_checkpoint(str(tmp_path / "siglip" / "checkpoints" / "latest.pt"), None, torch.device("cpu"))[0]
    assert torch.equal(loaded.logit_bias, t.model.logit_bias.detach())


def test_model_tokenizer_replaces_stored_clip_tokens(tiny_data):
    """A model whose tokenizer is not CLIP BPE (SigLIP: 32,000 ids) must not read the shards' CLIP BPE `tok`
    ids: the loader tokenises `txt` with the model's tokenizer instead; offline, a missing HF tokenizer is a
    clear error naming HF_HUB_OFFLINE."""
    from dissect_fast.data.loader import ShardDataset, TorchLoader
    from dissect_fast.data.shards import DatasetIndex
    from dissect_fast.model import text_tokenizer, uses_clip_bpe

    assert uses_clip_bpe("micro-vit") and uses_clip_bpe("RN50") and not uses_clip_bpe("ViT-B-16-SigLIP")
    assert text_tokenizer("micro-vit") is None
    try:
        text_tokenizer("ViT-B-16-SigLIP")
    except ValueError as e:
        assert "ViT-B-16-SigLIP" in str(e) and "HF_HUB_OFFLINE" in str(e)

    class Fake:
        def __call__(self, texts, context_length=None):
            return torch.full((len(texts), context_length), 7, dtype=torch.long)

    idx = DatasetIndex.load(str(tiny_data / "train"))
    assert idx.has_tokens
    import torchvision.transforms as T

    tf = T.Compose([T.ToTensor()])
    ds = ShardDataset(idx.shard_paths()[:1], 8, tf, 24, train=False, num_ids=idx.num_ids, tokenizer=Fake())
    _, toks, _ = next(iter(TorchLoader(ds, 0, torch.device("cpu"), drop_last=True)))
    assert (toks == 7).all()
    ds = ShardDataset(idx.shard_paths()[:1], 8, tf, 24, train=False, num_ids=idx.num_ids)
    _, toks, _ = next(iter(TorchLoader(ds, 0, torch.device("cpu"), drop_last=True)))
    assert (toks != 7).any() and toks.max() <= 49407


# ------------------------------------------------------------------ --accum-freq


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_accumulation_is_exact(tiny_data, tmp_path, loss):
    """--accum-freq 2 --batch-size 8 gives the gradient of one step on the 16 concatenated samples."""
    extra = ["--siglip"] if loss == "siglip" else []
    a = make(tiny_data, tmp_path, f"acc-{loss}", "--accum-freq", "2", *extra, batch=8)
    b = make(tiny_data, tmp_path, f"one-{loss}", *extra, batch=16)
    assert a.steps_per_epoch == 240 // 16 == b.steps_per_epoch
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n  # same seed: same initial weights
    images, tokens, ids = first_batch(b)
    la = a.train_step(0, (images[:8], images[8:]), (tokens[:8], tokens[8:]), (ids[:8], ids[8:]))
    lb = b.train_step(0, images, tokens, ids)
    assert torch.allclose(la, lb, rtol=1e-5, atol=1e-6)
    assert a.ctx.last_trained == 16
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), n


def test_accumulation_with_dissect_warmup(tiny_data, tmp_path):
    """Selection per batch of 8 (k = 4), two batches per optimizer step: the history records every batch's
    scores in the warm-up, the schedule counts optimizer steps, every selected sample trains."""
    t = make(
        tiny_data,
        tmp_path,
        "accwarm",
        "--accum-freq",
        "2",
        "--select-strategy",
        "dissect-warmup",
        "--select-rate",
        "0.5",
        "--warmup-point",
        "1",
        "--epochs",
        "2",
        batch=8,
    )
    assert t.steps_per_epoch == 15 and t.total_steps == 30
    metrics = t.fit()
    assert t.step == 30
    h = t.strategy.history.values
    assert (~torch.isnan(h)).sum().item() == 15 * 2 * 8  # every batch of the warm-up epoch was scored
    for m in metrics:
        assert m["select/trained_samples"] == 15 * 2 * 4 and math.isfinite(m["train_loss"])
        assert m["samples_seen"] == m["step"] * 16


def test_accum_freq_and_flag_errors(tiny_data, capsys):
    base = ["--train-data", str(tiny_data / "train"), "--model", "micro-vit"]
    for extra, match in (
        (["--accum-freq", "0"], "--accum-freq must be >= 1"),
        (["--siglip", "--local-loss"], "drop --local-loss"),
        (["--lock-image-freeze-bn-stats"], "add --lock-image"),
    ):
        with pytest.raises(SystemExit):
            config_from_args(base + extra)
        assert match in capsys.readouterr().err
