"""The decoder on the embedded SmolLM2-135M-Instruct.

(a) Our plain greedy decoding (`ar`: jitted prefill + KV-cache loop) reproduces transformers' greedy `generate`
    token for token.
(b) Greedy Medusa with random (identity + noise) shared heads reproduces our plain greedy decoding for several
    trees, on MT-Bench first turns.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import pytest

from infer import generate_ids
from medusa_jax import chat, model
from medusa_jax.config import HeadsConfig

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain in two sentences why the sky is blue."]
MT_BENCH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mt_bench_questions.jsonl"


def test_plain_greedy_matches_transformers(embedded, embedded_torch):
    hf_model = embedded_torch
    import torch

    ids = [chat.render_prompt(embedded.tokenizer, p) for p in PROMPTS]
    ours = generate_ids(embedded, ids, max_new_tokens=40, mode="ar")  # one batched call, right-padded prompts
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on 2 shared cores, torch's thread pool contends with itself (7x slower)
    try:
        for row, prompt in enumerate(ids):
            with torch.no_grad():
                ref = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=40,
                                        eos_token_id=list(embedded.config.eos_token_ids))
            assert ours.tokens[row] == ref[0, len(prompt):].tolist(), PROMPTS[row]
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def perturbed(embedded):
    """The embedded base with 4 shared-projection heads: identity plus small noise (drafts sometimes right)."""
    hc = HeadsConfig(num_heads=4, num_layers=1, projection="shared")
    heads = model.init_heads(hc, embedded.config, embedded.base)
    keys = iter(jax.random.split(jax.random.PRNGKey(0), len(heads)))
    heads = {k: v + 0.002 * jax.random.normal(next(keys), v.shape, v.dtype) for k, v in heads.items()}
    return embedded.with_heads(heads, hc)


@pytest.fixture(scope="module")
def mt_bench_ids(embedded):
    if not MT_BENCH.exists():
        pytest.skip(f"{MT_BENCH} not found")
    questions = [json.loads(line) for line in MT_BENCH.read_text().splitlines()[:2]]
    return [chat.render_prompt(embedded.tokenizer, q["turns"][0]) for q in questions]


@pytest.fixture(scope="module")
def plain(perturbed, mt_bench_ids):
    return generate_ids(perturbed, mt_bench_ids, max_new_tokens=64, mode="ar", stop_ids=())


# The 64-node mc_sim_7b_63 on this model runs in test_shipped_heads.py (10 prompts x 128 tokens, trained heads).
@pytest.mark.parametrize("tree", ["chain:4", [1, 3, 2]], ids=str)
def test_greedy_medusa_matches_plain_greedy(perturbed, mt_bench_ids, plain, tree):
    out = generate_ids(perturbed, mt_bench_ids, max_new_tokens=64, mode="greedy", tree=tree, stop_ids=())
    assert out.tokens == plain.tokens
    assert (out.accepted > 0).any()  # some drafts were accepted, so compaction ran on the real model


def test_heads_eval_reports_accuracy_and_tokens_per_step(embedded, capsys):
    """`python -m infer.heads_eval` on the shipped heads: per-head top-1 <= top-5 rates, and the tokens per step of
    real greedy decoding with the given tree (between 1 and the tree's depth + 1)."""
    from infer import heads_eval

    heads_eval.main(["--limit", "1", "--max-new-tokens", "12", "--tree", "chain:2", "--grow", "1"])
    out = capsys.readouterr().out
    row = json.loads(out.splitlines()[0])
    assert row["heads"] == "shipped" and len(row["top1"]) == embedded.heads_config.num_heads
    assert all(0 <= a <= b <= 1 for a, b in zip(row["top1"], row["top5"]))
    assert 0 < row["tokens"] <= 12 and 1.0 <= row["tokens_per_step"] <= 3.0
    assert "| shipped |" in out and "tokens per step" in out
    # --grow: the 1-draft-node tree from the shipped tree.json's accuracy, predicted and measured
    assert row["grown_from"] == "tree.json (tuning prompts)"
    (line,) = [line for line in out.splitlines() if line.startswith("| 2 |")]
    nodes, depth, predicted, measured = (float(c) for c in line.strip("| ").split(" | "))
    assert depth == 1 and 1.0 < predicted < 2.0 and 1.0 <= measured <= 2.0


def test_grown_trees_are_the_tuners_trees_and_predictions(embedded):
    """`heads_eval.grown_trees`: the tree of each size is `grow_tree_sequence`'s, its prediction 1 + the expected
    accepted length, and a 1-node tree's measured tokens per step is 1 + the rate its one draft was accepted."""
    import numpy as np

    from infer import heads_eval
    from medusa_jax import chat
    from medusa_jax.tree import expected_accept_length, grow_tree_sequence

    acc = np.array([[0.5, 0.2], [0.3, 0.1], [0.2, 0.1], [0.1, 0.05]])
    prompt = chat.render_prompt(embedded.tokenizer, "Name three colours.")
    rows = heads_eval.grown_trees(embedded, [prompt], [1, 5], acc, 10)
    for row, n in zip(rows, (1, 5)):
        want = [list(p) for p in grow_tree_sequence(acc, 5)[n - 1]]
        assert row["tree"] == want and row["nodes"] == n + 1
        assert np.isclose(row["predicted_tokens_per_step"], 1 + expected_accept_length(want, acc))
    assert rows[0]["tree"] == [[0]] and 1.0 <= rows[0]["tokens_per_step"] <= 2.0
