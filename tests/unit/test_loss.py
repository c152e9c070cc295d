"""GDRT objective and SFT loss against hand-derived numbers (method.md §5).

All hand cases use the same trick: every position's logits are log([1/2, 1/4, 1/8, 1/8]), so the
cross-entropy of label 0 is ln 2, of label 1 is 2 ln 2 and of label 2 is 3 ln 2, and exp(L_g / tau)
with tau = 1 is a power of two.
"""

from __future__ import annotations

import math

import pytest
import torch

from gdrt_core.errors import GdrtError
from gdrt_core.loss import (
    GroupLossEMA,
    all_reduce_group_totals,
    dro_objective,
    dro_weights,
    gdrt_loss,
    group_losses_from_sums,
    group_sums,
    group_token_counts,
    sft_loss,
    token_cross_entropy,
    weighted_token_loss,
)

LN2 = math.log(2.0)
# label -> cross-entropy in units of ln 2 under the fixed distribution below
PROBS = torch.tensor([0.5, 0.25, 0.125, 0.125])


def fixed_logits(batch: int, seq: int) -> torch.Tensor:
    return PROBS.log().expand(batch, seq, 4).clone().requires_grad_(True)  # [B, T, V]


def approx(x, rel=1e-6, abs=1e-6):  # noqa: A002
    return pytest.approx(x, rel=rel, abs=abs)


# --- SFT ---------------------------------------------------------------------------------------------


def test_sft_loss_is_token_mean_over_labelled_tokens():
    """labels [[0, 2, -100], [1, -100, -100]] -> ce ln2, 3 ln2, 2 ln2 -> mean = 6 ln2 / 3 = 2 ln2 = 1.386294."""
    logits = fixed_logits(2, 3)
    labels = torch.tensor([[0, 2, -100], [1, -100, -100]])
    assert sft_loss(logits, labels).item() == approx(2 * LN2)


def test_sft_loss_without_targets_is_zero_and_backpropagates():
    logits = fixed_logits(1, 2)
    loss = sft_loss(logits, torch.full((1, 2), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)


def test_token_cross_entropy_matches_full_rows_cross_entropy_in_bf16():
    """Only the target rows are scored; the values equal F.cross_entropy over every row in float32."""
    logits, labels, _ = random_batch(3)
    logits = logits.to(torch.bfloat16)
    ce, mask = token_cross_entropy(logits, labels)
    reference = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view_as(ce)
    assert ce.dtype == torch.float32 and mask.tolist() == (labels != -100).tolist()
    torch.testing.assert_close(ce, reference)


# --- GDRT: the hand cases ----------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.3, 1.0, 7.0])
@pytest.mark.parametrize("prior", ["uniform", "size"])
def test_one_group_equals_sft(tau, prior):
    """All tokens in group 0 (ce = ln2, 3 ln2, 2 ln2): pi_0 = 1 after renormalisation, so
    L = tau * log(1 * exp(L_0 / tau)) = L_0 = (1 + 3 + 2) ln2 / 3 = 2 ln2, whatever tau; w = [1, 0, 0]."""
    logits = fixed_logits(2, 3)
    labels = torch.tensor([[0, 2, -100], [1, -100, -100]])
    groups = torch.tensor([[0, 0, -1], [0, -1, -1]])
    loss, stats = gdrt_loss(logits, labels, groups, num_groups=3, tau=tau, prior=prior)
    assert loss.item() == approx(2 * LN2)
    assert loss.item() == approx(sft_loss(logits, labels).item())
    assert stats.weights.tolist() == approx([1.0, 0.0, 0.0])
    assert stats.group_counts.tolist() == [3, 0, 0]
    assert stats.sft_loss.item() == approx(2 * LN2)


def test_equal_group_losses_give_prior_weights():
    """g0 = {ln2, 3 ln2} -> L_0 = 2 ln2; g1 = {2 ln2} -> L_1 = 2 ln2. Equal losses: exp(L/tau) cancels,
    w = pi: uniform [1/2, 1/2], size [2/3, 1/3]; L = tau log(sum pi e^{2 ln2 / tau}) = 2 ln2."""
    logits = fixed_logits(1, 3)
    labels = torch.tensor([[0, 2, 1]])
    groups = torch.tensor([[0, 0, 1]])
    loss, stats = gdrt_loss(logits, labels, groups, num_groups=2, tau=0.5)
    assert stats.weights.tolist() == approx([0.5, 0.5])
    assert loss.item() == approx(2 * LN2)
    _, stats = gdrt_loss(logits, labels, groups, num_groups=2, tau=0.5, prior="size")
    assert stats.weights.tolist() == approx([2 / 3, 1 / 3])


def two_group_batch():
    """g0 = three tokens of ce ln2 (L_0 = ln2), g1 = one token of ce 3 ln2 (L_1 = 3 ln2), one ignored."""
    logits = fixed_logits(1, 5)
    labels = torch.tensor([[0, 0, -100, 0, 2]])
    groups = torch.tensor([[0, 0, -1, 0, 1]])
    return logits, labels, groups


def test_tau_one_closed_form():
    """tau = 1: e^{L_0} = 2, e^{L_1} = 8.
    uniform: L = log(2/2 + 8/2) = log 5 = 1.609438; w = [1/5, 4/5].
    size (pi = [3/4, 1/4]): L = log(3/4 * 2 + 1/4 * 8) = log 3.5 = 1.252763; w = [1.5/3.5, 2/3.5] = [3/7, 4/7].
    The SFT loss of the same tokens: (3 ln2 + 3 ln2) / 4 = 1.5 ln2."""
    logits, labels, groups = two_group_batch()
    loss, stats = gdrt_loss(logits, labels, groups, num_groups=2, tau=1.0)
    assert loss.item() == approx(math.log(5))
    assert stats.weights.tolist() == approx([0.2, 0.8])
    assert stats.group_losses.tolist() == approx([LN2, 3 * LN2])
    assert stats.group_counts.tolist() == [3, 1]
    assert stats.sft_loss.item() == approx(1.5 * LN2)
    loss, stats = gdrt_loss(logits, labels, groups, num_groups=2, tau=1.0, prior="size")
    assert loss.item() == approx(math.log(3.5))
    assert stats.weights.tolist() == approx([3 / 7, 4 / 7])


def test_large_tau_approaches_prior_weighted_mean():
    """tau -> inf: tau log E_pi[e^{L/tau}] = E_pi[L] + Var_pi(L) / (2 tau) + O(tau^-2).
    uniform: E = (ln2 + 3 ln2) / 2 = 2 ln2 = 1.386294, Var = (ln2)^2 = 0.480453, so at tau = 1e4 the
    gap is 2.4e-5. size (pi = [3/4, 1/4]): E = 3/4 ln2 + 3/4 ln2 = 1.5 ln2 (= the SFT loss).
    tau = inf is computed exactly: w = pi."""
    logits, labels, groups = two_group_batch()
    loss, _ = gdrt_loss(logits, labels, groups, num_groups=2, tau=1e4)
    assert loss.item() == approx(2 * LN2 + LN2**2 / 2e4, rel=1e-5)
    loss, stats = gdrt_loss(logits, labels, groups, num_groups=2, tau=math.inf)
    assert loss.item() == approx(2 * LN2)
    assert stats.weights.tolist() == approx([0.5, 0.5])
    loss, stats = gdrt_loss(logits, labels, groups, num_groups=2, tau=math.inf, prior="size")
    assert loss.item() == approx(1.5 * LN2)
    assert stats.weights.tolist() == approx([0.75, 0.25])


def test_small_tau_approaches_worst_group():
    """tau = 0.01: L = L_1 + tau log(1/2 (1 + e^{-(L_1 - L_0)/tau})), (L_1 - L_0)/tau = 138.6 so the
    exponential is < 1e-60: L = 3 ln2 - 0.01 ln2 = 2.99 ln2 = 2.072493; w = [~0, 1].
    tau = 0 is exact: L = max = 3 ln2, w = [0, 1]."""
    logits, labels, groups = two_group_batch()
    loss, stats = gdrt_loss(logits, labels, groups, num_groups=2, tau=0.01)
    assert loss.item() == approx(2.99 * LN2)
    assert stats.weights.tolist() == approx([0.0, 1.0])
    loss, stats = gdrt_loss(logits, labels, groups, num_groups=2, tau=0.0)
    assert loss.item() == approx(3 * LN2)
    assert stats.weights.tolist() == [0.0, 1.0]


def test_tiny_tau_is_finite():
    """tau = 1e-6: L_1 / tau = 2e6; a naive exp overflows, the logsumexp form gives 3 ln2 - 1e-6 ln2."""
    logits, labels, groups = two_group_batch()
    loss, _ = gdrt_loss(logits, labels, groups, num_groups=2, tau=1e-6)
    loss.backward()
    assert loss.item() == approx(3 * LN2)
    assert torch.isfinite(logits.grad).all()


def test_absent_groups_drop_out_and_prior_renormalises():
    """num_groups = 4, only groups 1 (L = ln2) and 3 (L = 3 ln2) present, tau = 1.
    uniform over the present: L = log(2/2 + 8/2) = log 5, w = [0, 1/5, 0, 4/5].
    explicit masses [4, 1, 2, 3] -> over {1, 3}: pi = [1/4, 3/4]; L = log(2/4 + 3 * 8/4) = log 6.5,
    w = [0, 0.5/6.5, 0, 6/6.5] = [0, 1/13, 0, 12/13]."""
    logits, labels, _ = two_group_batch()
    groups = torch.tensor([[1, 1, -1, 1, 3]])
    loss, stats = gdrt_loss(logits, labels, groups, num_groups=4)
    assert loss.item() == approx(math.log(5))
    assert stats.weights.tolist() == approx([0, 0.2, 0, 0.8])
    assert stats.group_counts.tolist() == [0, 3, 0, 1]
    assert set(stats.as_log_dict()) == {
        "gdrt_loss",
        "sft_loss",
        "group_tokens/0",
        "group_tokens/1",
        "group_tokens/2",
        "group_tokens/3",
        "group_loss/1",
        "group_loss/3",
        "group_weight/1",
        "group_weight/3",
    }
    loss, stats = gdrt_loss(logits, labels, groups, num_groups=4, prior=[4.0, 1.0, 2.0, 3.0])
    assert loss.item() == approx(math.log(6.5))
    assert stats.weights.tolist() == approx([0, 1 / 13, 0, 12 / 13])


def test_empty_batch_gives_zero_and_finite_gradients():
    logits = fixed_logits(1, 3)
    loss, stats = gdrt_loss(logits, torch.full((1, 3), -100), torch.full((1, 3), -1), num_groups=2)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad == 0)
    assert stats.weights.tolist() == [0.0, 0.0]


def test_bad_group_ids_and_settings_are_user_errors():
    logits, labels, _ = two_group_batch()
    with pytest.raises(GdrtError, match="group id 5"):
        gdrt_loss(logits, labels, torch.tensor([[0, 0, -1, 0, 5]]), num_groups=2)
    with pytest.raises(GdrtError, match="group id -1"):
        gdrt_loss(logits, labels, torch.tensor([[0, -1, 0, 0, 1]]), num_groups=2)
    with pytest.raises(GdrtError, match="tau"):
        gdrt_loss(logits, labels, torch.tensor([[0, 0, -1, 0, 1]]), num_groups=2, tau=-1.0)
    with pytest.raises(GdrtError, match="prior"):
        gdrt_loss(logits, labels, torch.tensor([[0, 0, -1, 0, 1]]), num_groups=2, prior="zipf")


# --- gradients ---------------------------------------------------------------------------------------


def random_batch(seed: int, batch=8, seq=6, vocab=11, num_groups=4):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[torch.rand(batch, seq, generator=gen) < 0.3] = -100
    groups = torch.randint(0, num_groups, (batch, seq), generator=gen)
    groups[labels == -100] = -1
    return logits, labels, groups


def direct_gdrt(logits, labels, groups, num_groups, tau, prior):
    """The formula written out token by token, no logsumexp, no scatter."""
    logp = torch.log_softmax(logits, dim=-1)
    group_ce = {g: [] for g in range(num_groups)}
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            if labels[b, t] != -100:
                group_ce[int(groups[b, t])].append(-logp[b, t, labels[b, t]])
    present = [g for g in range(num_groups) if group_ce[g]]
    total = sum(len(group_ce[g]) for g in present)
    pi = {g: (1 / len(present) if prior == "uniform" else len(group_ce[g]) / total) for g in present}
    losses = {g: torch.stack(group_ce[g]).mean() for g in present}
    return tau * torch.log(sum(pi[g] * torch.exp(losses[g] / tau) for g in present))


@pytest.mark.parametrize("tau,prior", [(1.0, "uniform"), (0.25, "size"), (3.0, "uniform")])
def test_gradient_matches_autograd_on_direct_formula(tau, prior):
    logits, labels, groups = random_batch(0)
    a = logits.clone().requires_grad_(True)
    loss, _ = gdrt_loss(a, labels, groups, num_groups=4, tau=tau, prior=prior)
    loss.backward()
    b = logits.clone().requires_grad_(True)
    ref = direct_gdrt(b, labels, groups, 4, tau, prior)
    ref.backward()
    assert loss.item() == approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-7)


def test_closed_form_weights_are_dL_dLg():
    """dL/dL_g = pi_g e^{L_g/tau} / sum_h pi_h e^{L_h/tau} = w_g: autograd on dro_objective agrees."""
    losses = torch.tensor([0.7, 2.1, 1.3, 0.0], requires_grad=True)
    counts = torch.tensor([5, 2, 9, 0])
    for prior in ("uniform", "size"):
        losses.grad = None
        dro_objective(losses, counts, prior, 0.6).backward()
        torch.testing.assert_close(losses.grad, dro_weights(losses, counts, prior, 0.6))


# --- exactness under accumulation / data parallelism -------------------------------------------------


def tiny_model_batch(seed=1, batch=8, seq=5, hidden=6, vocab=9, num_groups=3):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(hidden, vocab, generator=gen, dtype=torch.float64)
    features = torch.randn(batch, seq, hidden, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[:, :2] = -100  # a prompt
    groups = torch.randint(0, num_groups, (batch, seq), generator=gen)
    groups[labels == -100] = -1
    groups[:2][labels[:2] != -100] = 0  # micro-batch 0 sees group 0 only: absent groups within a split
    return weight, features, labels, groups


@pytest.mark.parametrize("tau,prior", [(1.0, "uniform"), (0.2, "size"), (5.0, "uniform")])
def test_surrogate_summed_over_four_micro_batches_equals_full_gradient(tau, prior):
    """Split the batch of 8 into 4 micro-batches of 2: a no-grad look-ahead sums S_g and N_g over them,
    w = dro_weights(S/N, N); then sum_k grad weighted_token_loss(micro-batch k) = grad gdrt_loss(all)."""
    weight, features, labels, groups = tiny_model_batch()
    num_groups = 3
    w_full = weight.clone().requires_grad_(True)
    full_loss, full_stats = gdrt_loss(
        features @ w_full, labels, groups, num_groups=num_groups, tau=tau, prior=prior
    )
    full_loss.backward()

    w_split = weight.clone().requires_grad_(True)
    parts = [slice(k, k + 2) for k in range(0, 8, 2)]
    with torch.no_grad():
        sums = torch.zeros(num_groups, dtype=torch.float32)
        counts = torch.zeros(num_groups, dtype=torch.long)
        for p in parts:
            s, n = group_sums(features[p] @ w_split, labels[p], groups[p], num_groups=num_groups)
            sums, counts = sums + s, counts + n
    step_weights = dro_weights(group_losses_from_sums(sums, counts), counts, prior, tau)
    value = 0.0
    for p in parts:
        part_loss = weighted_token_loss(features[p] @ w_split, labels[p], groups[p], step_weights, counts)
        part_loss.backward()
        value += part_loss.item()

    torch.testing.assert_close(step_weights, full_stats.weights)
    torch.testing.assert_close(counts, full_stats.group_counts)
    assert value == approx((full_stats.weights * full_stats.group_losses).sum().item(), rel=1e-6)
    torch.testing.assert_close(w_split.grad, w_full.grad, rtol=1e-6, atol=1e-8)


# --- lagged weights ----------------------------------------------------------------------------------


def test_group_loss_ema_by_hand():
    """ema = 0.5, 3 groups.
    step 1: L = [1, 2, -] (g2 absent) -> v = [1, 2, -], seen [T, T, F]; weights use g2 := mean(1, 2) = 1.5.
    step 2: L = [3, -, 4] -> v0 = 0.5*1 + 0.5*3 = 2, v1 = 2 (kept), v2 = 4 (first sight) -> [2, 2, 4]."""
    tracker = GroupLossEMA(3, ema=0.5)
    assert tracker.losses_for_weights().tolist() == [0.0, 0.0, 0.0]
    tracker.update(torch.tensor([1.0, 2.0, 0.0]), torch.tensor([4, 1, 0]))
    assert tracker.losses_for_weights().tolist() == approx([1.0, 2.0, 1.5])
    tracker.update(torch.tensor([3.0, 0.0, 4.0]), torch.tensor([2, 0, 7]))
    assert tracker.losses_for_weights().tolist() == approx([2.0, 2.0, 4.0])
    restored = GroupLossEMA(3, ema=0.5)
    restored.load_state_dict(tracker.state_dict())
    assert restored.losses_for_weights().tolist() == approx([2.0, 2.0, 4.0])
    with pytest.raises(GdrtError, match="ema"):
        GroupLossEMA(3, ema=1.0)


def test_group_token_counts_need_no_forward():
    """two_group_batch: groups [0, 0, -, 0, 1] on labelled tokens -> N = [3, 1]."""
    _, labels, groups = two_group_batch()
    assert group_token_counts(labels, groups, num_groups=2).tolist() == [3, 1]


def test_batch_weights_match_gdrt_loss_on_the_whole_batch():
    weight, features, labels, groups = tiny_model_batch()
    loss, stats = gdrt_loss(features @ weight, labels, groups, num_groups=3, tau=0.7)
    sums, counts = group_sums(features @ weight, labels, groups, num_groups=3)
    losses = group_losses_from_sums(sums, counts)
    torch.testing.assert_close(dro_weights(losses, counts, "uniform", 0.7), stats.weights)
    assert dro_objective(losses, counts, "uniform", 0.7).item() == approx(loss.item())


def test_lagged_weights_by_hand_and_split_invariance():
    """Previous step's group losses [ln2, 3 ln2], both groups present now, tau = 1, uniform:
    w = [2, 8] / 10 = [0.2, 0.8] (as in test_tau_one_closed_form). With w fixed, the surrogate is linear
    in the tokens: its gradient summed over a 4-way split equals its gradient on the whole batch."""
    tracker = GroupLossEMA(3)
    tracker.update(torch.tensor([LN2, 3 * LN2, 0.0]), torch.tensor([5, 5, 0]))
    weights = dro_weights(tracker.losses_for_weights(), torch.tensor([4, 2, 0]), "uniform", 1.0)
    assert weights.tolist() == approx([0.2, 0.8, 0.0])

    weight, features, labels, groups = tiny_model_batch()
    tracker.update(torch.tensor([0.0, 0.0, 1.7]), torch.tensor([0, 0, 1]))
    counts = group_token_counts(labels, groups, num_groups=3)
    weights = dro_weights(tracker.losses_for_weights(), counts, "size", 0.5)
    w_full = weight.clone().requires_grad_(True)
    weighted_token_loss(features @ w_full, labels, groups, weights, counts).backward()
    w_split = weight.clone().requires_grad_(True)
    for k in range(0, 8, 2):
        p = slice(k, k + 2)
        weighted_token_loss(features[p] @ w_split, labels[p], groups[p], weights, counts).backward()
    torch.testing.assert_close(w_split.grad, w_full.grad, rtol=1e-9, atol=1e-12)


def _data_parallel_worker(rank: int, world_size: int, init_file: str, out_file: str) -> None:
    """One rank: half the batch in 2 micro-batches; look-ahead sums, all-reduce, surrogate backward scaled
    by the world size, gradient averaged over ranks as DDP does."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    weight, features, labels, groups = tiny_model_batch()
    rows = slice(rank * 4, rank * 4 + 4)
    features, labels, groups = features[rows], labels[rows], groups[rows]
    parts = [slice(0, 2), slice(2, 4)]
    w = weight.clone().requires_grad_(True)
    with torch.no_grad():
        totals = [group_sums(features[p] @ w, labels[p], groups[p], num_groups=3) for p in parts]
    sums = sum(t[0] for t in totals)
    counts = sum(t[1] for t in totals)
    sums, counts, _ = all_reduce_group_totals(sums, counts)
    losses = group_losses_from_sums(sums, counts)
    weights = dro_weights(losses, counts, "size", 0.4)
    objective = dro_objective(losses, counts, "size", 0.4)
    for p in parts:
        (world_size * weighted_token_loss(features[p] @ w, labels[p], groups[p], weights, counts)).backward()
    dist.all_reduce(w.grad, op=dist.ReduceOp.SUM)
    w.grad /= world_size
    if rank == 0:
        torch.save({"grad": w.grad, "objective": objective, "counts": counts}, out_file)
    dist.destroy_process_group()


def test_two_processes_over_gloo_match_the_single_batch_gradient(tmp_path):
    """2 ranks x 2 micro-batches x 2 rows = the batch of 8: same L_GDRT, counts and gradient as gdrt_loss
    on the whole batch in one process."""
    import torch.multiprocessing as mp

    out_file = tmp_path / "rank0.pt"
    mp.spawn(_data_parallel_worker, args=(2, str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    result = torch.load(out_file)

    weight, features, labels, groups = tiny_model_batch()
    w = weight.clone().requires_grad_(True)
    loss, stats = gdrt_loss(features @ w, labels, groups, num_groups=3, tau=0.4, prior="size")
    loss.backward()
    assert result["objective"].item() == approx(loss.item())
    assert result["counts"].tolist() == stats.group_counts.tolist()
    torch.testing.assert_close(result["grad"], w.grad, rtol=1e-6, atol=1e-8)


def test_all_reduce_is_a_no_op_without_distributed():
    sums, counts = torch.tensor([1.0, 2.0]), torch.tensor([3, 4])
    assert all_reduce_group_totals(sums, counts, 7.0) == (sums, counts, 7.0)


def test_tiny_llama_accumulation_with_per_micro_batch_padding():
    """A 2-layer Llama, 8 sequences of different lengths. Whole batch (padded to 12) with gdrt_loss vs
    4 micro-batches of 2, each right-padded to its own length, with the look-ahead and the surrogate:
    the same gradient on every parameter (labels shifted by the caller, as gdrt_loss does not shift)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).double()
    gen = torch.Generator().manual_seed(5)
    lengths = [12, 5, 9, 7, 12, 3, 10, 6]
    seqs = [torch.randint(1, 50, (n,), generator=gen) for n in lengths]
    groups_of = [torch.randint(0, 3, (n,), generator=gen) for n in lengths]
    prompt = 2  # the first two tokens of every sequence are prompt (no loss)

    def pad(rows):
        width = max(lengths[r] for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        attention = torch.zeros(len(rows), width, dtype=torch.long)
        labels = torch.full((len(rows), width), -100)
        groups = torch.full((len(rows), width), -1)
        for j, r in enumerate(rows):
            n = lengths[r]
            ids[j, :n], attention[j, :n] = seqs[r], 1
            labels[j, prompt:n], groups[j, prompt:n] = seqs[r][prompt:], groups_of[r][prompt:]
        return ids, attention, labels[:, 1:], groups[:, 1:]  # next-token targets

    def logits_of(ids, attention):
        return model(input_ids=ids, attention_mask=attention).logits[:, :-1]  # [B, T-1, V]

    ids, attention, labels, groups = pad(range(8))
    loss, _ = gdrt_loss(logits_of(ids, attention), labels, groups, num_groups=3, tau=0.5)
    loss.backward()
    full_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    parts = [pad(range(k, k + 2)) for k in range(0, 8, 2)]
    with torch.no_grad():
        totals = [group_sums(logits_of(i, a), lab, g, num_groups=3) for i, a, lab, g in parts]
    sums, counts = sum(t[0] for t in totals), sum(t[1] for t in totals)
    losses = group_losses_from_sums(sums, counts)
    weights = dro_weights(losses, counts, "uniform", 0.5)
    for i, a, lab, g in parts:
        weighted_token_loss(logits_of(i, a), lab, g, weights, counts).backward()
    assert dro_objective(losses, counts, "uniform", 0.5).item() == approx(loss.item())
    for full, p in zip(full_grads, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, full, rtol=1e-7, atol=1e-10)
