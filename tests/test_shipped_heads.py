"""Greedy Medusa with the heads shipped in checkpoints/smollm2_135m/ equals plain greedy decoding.

Ten MT-Bench first turns, 128 new tokens each, decoded as one batch per tree (right-padded prompts with
per-sequence lengths), for a chain, a dense tree and the original's 64-node `mc_sim_7b_63`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infer import generate_ids
from medusa_jax import chat
from medusa_jax.loading import DEFAULT_HEADS_DIR

MT_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "mt_bench_questions.jsonl"


@pytest.fixture(scope="module")
def prompts(embedded):
    if not MT_BENCH.is_file():
        pytest.skip("MT-Bench questions (../shared/data) are only in the project's own checkout")
    questions = [json.loads(line) for line in MT_BENCH.read_text().splitlines() if line.strip()][:10]
    return [chat.render_prompt(embedded.tokenizer, q["turns"][0]) for q in questions]


@pytest.fixture(scope="module")
def plain(embedded, prompts):
    return generate_ids(embedded, prompts, max_new_tokens=128, mode="ar")


def test_shipped_heads_are_attached(embedded):
    assert (DEFAULT_HEADS_DIR / "medusa_lm_head.safetensors").is_file()
    assert embedded.heads is not None and embedded.heads_config.num_heads == 4


@pytest.mark.parametrize("tree", ["chain:4", [1, 3, 2], "mc_sim_7b_63"], ids=["chain4", "dense_3_2", "mc_sim_7b_63"])
def test_greedy_medusa_equals_plain_greedy(embedded, prompts, plain, tree):
    out = generate_ids(embedded, prompts, max_new_tokens=128, mode="greedy", tree=tree)
    for row in range(len(prompts)):
        assert out.tokens[row] == plain.tokens[row], f"prompt {row}"
    ran = out.accepted >= 0
    assert out.accepted[ran].sum() > 0  # the trained heads' drafts were accepted: the tree path really ran
    assert out.steps < max(len(t) for t in plain.tokens)
