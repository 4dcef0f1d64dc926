"""Convergence: a tiny model of every family trained for STEPS AdamW steps, patched and unpatched
from the same initial weights on the same fixed synthetic data, follows the same trajectory: the
loss at every step, the final parameters and the top-k log-probabilities on held-out tokens.  A
one-step test (test_families, test_hf) cannot see an error that only shows once it has gone round
the optimizer: a small gradient error that AdamW turns into a different update, a rounding that
drifts, a path (padding, packing, LoRA) whose error compounds.  float32 and bfloat16, every
family; LLaMA also on right- and left-padded batches, on packed rows (position_ids restarting at
0, with and without ``use_cache=False``) and with LoRA adapters (PEFT).

**Why no fixed tolerance.**  Training amplifies rounding.  AdamW's update ``lr * m / (sqrt(v) +
eps)`` divides by the gradient's own size, so a weight whose gradient is near ``eps`` (1e-8;
every tensor has some) moves by up to ``lr`` either way when that gradient changes in its last
bits.  Measured in float32: patched and unpatched gradients at the same weights agree to ~1e-6
of the tensor's largest at every step of a run, yet two *unpatched* runs whose initial weights
differ by one ulp end 20 steps apart by up to ~2e-3 of a tensor's largest weight (Phi-3; their
losses stay within a few ulps), and one run's distance from float64 varies up to twentyfold
with where the ulps fell (Qwen3: 3e-5 to 6e-4).  A fixed tolerance on the parameters is then
either too loose to catch anything or fails on a valid run.

**The rule** is the project's own (FlashAttention's, as in ``llama_kernels.oracle``), applied to
the whole run: the same training in float64 from the same initial weights is the oracle; in each
measure the patched run's error against it may be at most FACTOR (2) times the unpatched runs'
error at the same precision, plus a floor of 1e-6 of the measure's scale (it only matters where
unpatched is exact).  "The unpatched runs" are an ensemble, since one run alone is one draw of
that spread: the unpatched run itself and NUDGES runs from its initial weights nudged by at most
one ulp each (as valid a start as the original; in bfloat16 the ulp is bfloat16's), their worst
error, step by step and tensor by tensor.  Unpatched runs are cheap (no interpreter).  The
measures: the loss at every step; each trained tensor's max |error| / max |weight|; the held-out
log-probabilities of the oracle's top-k next tokens (gathered at the same token ids, so that
near-ties swapping ranks do not matter).

What this catches (measured on LLaMA by perturbing a kernel's backward): in float32, a fresh
random relative error of 1e-5 on the SwiGLU gate gradient or on attention's dq, ten times inside
test_families' one-step bound, fails by 6-8x (1e-4: by 70x) on the parameters.  The loss does
not show it, nor for dq the worst error over all tensors: hence tensor by tensor.  In bfloat16,
weights and AdamW state in bfloat16, the unpatched runs themselves end 0.3-0.75 of a tensor's
largest weight from float64 and their losses 5e-3 (LLaMA) to 1e-1 (Gemma 3) off: a fresh random
3% error on the SwiGLU gate gradient, or a 10% scaling of it, stays inside twice that.  The
bfloat16 runs catch only errors that move the training more than bfloat16 itself does.
"""
import copy

import pytest
import torch

import llama_kernels as lk
from llama_kernels.ops import registry
from llama_kernels.ops.common import LAUNCHES
from llama_kernels.integrations.transformers.families import FAMILIES
from helpers import launched_flags, max_error
from test_families import VOCAB, tiny_model

transformers = pytest.importorskip("transformers")

STEPS = 20
LR = 5e-3  # AdamW moves a weight by up to LR a step: ~0.1 over the run, 5x the initial weights' scale
BATCH, SEQ = 2, 16
BATCHES = 4  # the data: BATCHES fixed batches, cycled, so that the loss falls (~4.85 -> ~2.8-3.9)
TOP_K = 8
NUDGES = 8  # unpatched runs from nudged initial weights, besides the unpatched run itself
FACTOR = 2.0  # FlashAttention's rule: at most twice the unpatched runs' error
ALL_KERNELS = set(registry.FLAGS)


def small_model(family, device):
    """test_families' tiny model with one decoder layer, of the family's own kind: sliding-window
    where the family has such layers (Mistral, Qwen2/3, Gemma 2/3; Gemma 2's soft-capped too).
    LLaMA's has 2 query heads sharing 1 KV head (grouped-query attention: the attention kernels'
    grouping is the same whatever the family), the others one head.  Interpreter time goes by
    kernel launches and programs (batch x heads for attention): a patched training step takes
    ~0.5 s with 2 heads, ~0.35 s with 1."""
    options = FAMILIES[family].features
    heads = 2 if family == "llama" else 1
    small = dict(num_attention_heads=heads, num_key_value_heads=1, num_hidden_layers=1)
    if "layer_types" in options:
        small["layer_types"] = ["sliding_attention"]
    if "max_window_layers" in options:
        small["max_window_layers"] = 0  # Qwen: the layers from max_window_layers on slide
    return tiny_model(family, device, **small)


def launched_families():
    return launched_flags()


# --- data -------------------------------------------------------------------------------------

def plain_batches(device):
    """BATCHES batches of random token ids (labels = inputs) and a held-out batch, from seed 1."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (BATCHES + 1, BATCH, SEQ), generator=g).to(device)
    return [dict(input_ids=x, labels=x.clone()) for x in ids[:-1]], ids[-1]


def padded_batches(device, side):
    """Row 0 padded with 5 pad tokens on ``side``, row 1 full length (as a collator pads to the
    longest): attention mask 0, pad_token_id and label -100 at the padding."""
    batches, held_out = plain_batches(device)
    for b in batches:
        mask = torch.ones_like(b["input_ids"])
        if side == "right":
            mask[0, -5:] = 0
        else:
            mask[0, :5] = 0
        b["input_ids"] = b["input_ids"].masked_fill(mask == 0, 0)
        b["labels"] = b["input_ids"].masked_fill(mask == 0, -100)
        b["attention_mask"] = mask
    return batches, held_out


PACKING = [9, 12, 11]  # the lengths of the sequences packed in one row (BATCH * SEQ tokens)


def packed_batches(device, use_cache):
    """The same tokens as plain_batches', flattened into one row holding len(PACKING) sequences
    one after the other, as DataCollatorWithFlattening builds them: position_ids restarting at 0
    at each sequence start, the first token of each sequence no target (-100)."""
    batches, held_out = plain_batches(device)
    positions = torch.cat([torch.arange(n) for n in PACKING]).to(device)[None]
    for b in batches:
        ids = b["input_ids"].reshape(1, -1)
        b.update(input_ids=ids, labels=ids.masked_fill(positions == 0, -100), position_ids=positions)
        if use_cache is not None:
            b["use_cache"] = use_cache
    return batches, held_out


# --- training ---------------------------------------------------------------------------------

def trained_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run(model, batches, held_out):
    """STEPS AdamW steps over the cycled batches: the loss of every step (Python floats), the
    trained parameters, and the held-out batch's log-probabilities (float64) after training."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        log_probs = torch.log_softmax(model(held_out).logits.double(), dim=-1)
    return losses, trained_state(model), log_probs


def nudged(model, seed):
    """A copy of ``model`` with each weight moved one ulp up, one ulp down, or kept, at random."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            pick = torch.randint(0, 3, p.shape, generator=g).to(p.device)
            up = torch.nextafter(p, torch.full_like(p, float("inf")))
            down = torch.nextafter(p, torch.full_like(p, float("-inf")))
            p.copy_(torch.where(pick == 0, up, torch.where(pick == 1, down, p)))
    return model


def errors(result, oracle):
    """A run's errors against the oracle run: per step (loss), per tensor (max |error| / max
    |weight|), and the worst top-k log-probability error."""
    (losses, params, log_probs), (o_losses, o_params, o_log_probs) = result, oracle
    index = o_log_probs.topk(TOP_K, dim=-1).indices
    return {
        "loss": [abs(a - b) for a, b in zip(losses, o_losses)],
        "parameters": {n: max_error(params[n], o_params[n]) / o_params[n].abs().max().item() for n in o_params},
        f"top-{TOP_K} log-probabilities": max_error(log_probs.gather(-1, index), o_log_probs.gather(-1, index)),
    }


def assert_within_twice_unpatched(patched, ensemble, oracle):
    """The rule of the module docstring, in every measure: step by step, tensor by tensor."""
    got, runs = errors(patched, oracle), [errors(r, oracle) for r in ensemble]
    o_losses, _, o_log_probs = oracle
    failures = []
    for step, err in enumerate(got["loss"]):
        allowed = max(r["loss"][step] for r in runs)
        if not err <= FACTOR * allowed + 1e-6 * max(1.0, abs(o_losses[step])):  # NaN fails too
            failures.append(f"loss at step {step}: error {err:.3g}, unpatched runs' {allowed:.3g}")
    for name, err in got["parameters"].items():
        allowed = max(r["parameters"][name] for r in runs)
        if not err <= FACTOR * allowed + 1e-6:
            failures.append(f"parameter {name}: relative error {err:.3g}, unpatched runs' {allowed:.3g}")
    what = f"top-{TOP_K} log-probabilities"
    allowed = max(r[what] for r in runs)
    scale = o_log_probs.topk(TOP_K, dim=-1).values.abs().max().item()
    if not got[what] <= FACTOR * allowed + 1e-6 * max(1.0, scale):
        failures.append(f"{what}: error {got[what]:.3g}, unpatched runs' {allowed:.3g}")
    assert not failures, (f"patched (loss {patched[0][0]:.4f} -> {patched[0][-1]:.4f}): more than {FACTOR:g} x the "
                          "unpatched runs' error against float64:\n  " + "\n  ".join(failures))


def assert_converges_like_unpatched(model, batches, held_out):
    """Train ``model`` unpatched (with its nudged ensemble), patched and in float64, from the same
    initial weights, and hold the patched run to the rule."""
    before = trained_state(model)
    oracle = run(copy.deepcopy(model).double(), batches, held_out)
    unpatched = run(copy.deepcopy(model), batches, held_out)
    ensemble = [unpatched] + [run(nudged(model, seed), batches, held_out) for seed in range(NUDGES)]
    patched_model = lk.apply_kernels(copy.deepcopy(model))
    LAUNCHES.clear()
    patched = run(patched_model, batches, held_out)
    assert launched_families() == ALL_KERNELS, dict(LAUNCHES)

    # The run trained (else nothing was tested): the loss fell (by 20-40%; 1.2% for LoRA's adapters
    # on a frozen random model), every trained tensor moved by more than one step's LR somewhere.
    losses, params = unpatched[0], unpatched[1]
    assert losses[-1] < 0.99 * losses[0], f"the loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}"
    still = [n for n in params if (params[n].double() - before[n].double()).abs().max() <= LR]
    assert not still, f"parameters that hardly moved: {still}"
    assert_within_twice_unpatched(patched, ensemble, oracle)


# --- every family, float32 and bfloat16 -----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_convergence(family, dtype, device):
    """bfloat16: model.to(torch.bfloat16), so the weights and AdamW's state are bfloat16 too; the
    float64 oracle starts from the same (bfloat16) initial weights."""
    model = small_model(family, device).to(dtype)
    assert_converges_like_unpatched(model, *plain_batches(device))


# --- LLaMA: padding, packing, LoRA ----------------------------------------------------------------

@pytest.mark.parametrize("side", ["right", "left"])
def test_convergence_padded(side, device):
    assert_converges_like_unpatched(small_model("llama", device), *padded_batches(device, side))


@pytest.mark.parametrize("use_cache", [False, None], ids=["use_cache=False", "default"])
def test_convergence_packed(use_cache, device):
    """use_cache=False: transformers finds the packing in the restarting position_ids and keeps each
    sequence to itself.  By default (a cache is made, even in training) it does not: each row is
    one causal sequence across its packed ones, only RoPE restarts.  Either way the patched model
    trains as the unpatched one does."""
    assert_converges_like_unpatched(small_model("llama", device), *packed_batches(device, use_cache))


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # PEFT's call
def test_convergence_lora(device):
    """LoRA (r=8 on every projection of attention and MLP, adapters started non-zero), the base
    weights frozen: only the adapters train, through every kernel's backward."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
    model = small_model("llama", device)
    torch.manual_seed(2)  # the adapters' initial weights
    model = peft.get_peft_model(model, config)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trained) == 2 * 7 * model.config.num_hidden_layers and all("lora_" in n for n in trained)
    assert_converges_like_unpatched(model, *plain_batches(device))
