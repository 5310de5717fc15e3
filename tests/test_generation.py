"""Generation: batched == one-at-a-time greedy, EOS stops, resume skips done rows, seeded sampling."""

from __future__ import annotations


import pytest
import torch

from safeunits.eval.generation import ResumeMismatchError, generate, read_generations
from tiny import tiny_model, tiny_tokenizer

PROMPTS = ["hi", "a much longer prompt about several different things", "mid length one", "x" * 30, "why?",
           "tell me a story about a cat and a dog"]


@pytest.fixture()
def gen_model():
    # a larger init range than the default so greedy outputs differ between prompts (the default gives "\n\n\n...")
    return tiny_model(initializer_range=0.2, max_position_embeddings=1024)


def test_batched_equals_one_at_a_time(gen_model, tokenizer):
    batched = generate(gen_model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=4, progress=False)
    single = [generate(gen_model, tokenizer, [p], max_new_tokens=10, batch_size=1, progress=False)[0] for p in PROMPTS]
    assert batched == single
    assert len(set(batched)) > 1  # the check is not vacuous


def test_greedy_matches_manual_argmax_decoding(gen_model, tokenizer):
    """Reference computed another way: a plain argmax loop over full forward passes, no cache, no padding."""
    from safeunits.models.chat import prompt_text

    prompt = PROMPTS[2]
    ids = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(8):
            nxt = gen_model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    expected = tokenizer.decode(ids[0, -8:], skip_special_tokens=True)
    assert generate(gen_model, tokenizer, [PROMPTS[0], prompt], max_new_tokens=8, progress=False)[1] == expected


def test_stops_at_eos(gen_model, tokenizer):
    from safeunits.models.chat import prompt_text

    prompt = PROMPTS[1]
    ids = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = gen_model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=[])
    new = out[0, ids.shape[1]:].tolist()
    gen_model.generation_config.eos_token_id = new[3]  # the 4th greedy token now ends the answer
    first = new.index(new[3])
    text = generate(gen_model, tokenizer, [prompt], max_new_tokens=6, progress=False)[0]
    assert text == tokenizer.decode(new[:first], skip_special_tokens=True)


def test_response_prefix_is_forced_and_returned(gen_model, tokenizer):
    out = generate(gen_model, tokenizer, PROMPTS[:2], response_prefix="Sure, here is", max_new_tokens=5, progress=False)
    assert all(o.startswith("Sure, here is") for o in out)
    plain = generate(gen_model, tokenizer, PROMPTS[:2], max_new_tokens=5, progress=False)
    assert out != plain


@pytest.mark.parametrize("engine", ["continuous", "batched"])
def test_resume_skips_done_rows(gen_model, tokenizer, tmp_path, monkeypatch, engine):
    from safeunits.eval.continuous import SlotDecoder

    path = tmp_path / "gen.jsonl"
    full = generate(gen_model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=2, out_path=path, progress=False,
                    engine=engine)
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) == len(PROMPTS)
    # an interrupted run: 3 rows written, the 4th cut off mid-line
    path.write_text("".join(lines[:3]) + lines[3][:20])
    calls: list[int] = []
    original = gen_model.generate

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    original_run = SlotDecoder.run

    def counting_run(self, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return original_run(self, prompts, *args, **kwargs)

    monkeypatch.setattr(gen_model, "generate", counting)
    monkeypatch.setattr(SlotDecoder, "run", counting_run)
    resumed = generate(gen_model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=2, out_path=path, progress=False,
                       engine=engine)
    assert resumed == full
    assert sum(calls) == len(PROMPTS) - 3
    rows = read_generations(path)
    assert [r["index"] for r in rows] == list(range(len(PROMPTS)))
    assert [r["response"] for r in rows] == full
    calls.clear()
    assert generate(gen_model, tokenizer, PROMPTS, max_new_tokens=6, out_path=path, progress=False) == full
    assert calls == []


def test_resume_refuses_other_prompts_or_settings(gen_model, tokenizer, tmp_path):
    path = tmp_path / "gen.jsonl"
    generate(gen_model, tokenizer, PROMPTS[:2], max_new_tokens=4, out_path=path, progress=False)
    with pytest.raises(ResumeMismatchError, match="different prompt"):
        generate(gen_model, tokenizer, ["other", "prompts"], max_new_tokens=4, out_path=path, progress=False)
    with pytest.raises(ResumeMismatchError):
        generate(gen_model, tokenizer, PROMPTS[:2], max_new_tokens=5, out_path=path, progress=False)
    first_row = path.read_text().splitlines()[0]
    generate(gen_model, tokenizer, PROMPTS[:2], max_new_tokens=4, out_path=path, progress=False)
    path.write_text(first_row + "\nnot json\n")
    with pytest.raises(ResumeMismatchError, match=":2:"):
        generate(gen_model, tokenizer, PROMPTS[:2], max_new_tokens=4, out_path=path, progress=False)


@pytest.mark.parametrize("engine", ["continuous", "batched"])
def test_seeded_sampling(gen_model, tokenizer, engine):
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.0, progress=False, engine=engine)
    a = generate(gen_model, tokenizer, PROMPTS, seed=1, **kw)
    assert a == generate(gen_model, tokenizer, PROMPTS, seed=1, **kw)
    assert a != generate(gen_model, tokenizer, PROMPTS, seed=2, **kw)


def test_continuous_sampling_is_per_prompt(gen_model, tokenizer):
    """Each prompt draws from its own seeded generator: its sample does not depend on the slots or its neighbours."""
    kw = dict(max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, seed=3, progress=False)
    wide = generate(gen_model, tokenizer, PROMPTS, **kw)
    assert generate(gen_model, tokenizer, PROMPTS, batch_size=2, **kw) == wide
    assert generate(gen_model, tokenizer, PROMPTS[::-1][:4], **kw) == wide[::-1][:4]
    assert wide != generate(gen_model, tokenizer, PROMPTS, **{**kw, "do_sample": False})


RAGGED = [("q" * n) + " " + "why " * (n % 3) for n in (1, 3, 40, 7, 90, 2, 15, 60, 5, 33, 4, 120, 9, 11, 25, 70, 6, 8)]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_continuous_equals_batched_ragged_with_early_eos(family, tokenizer):
    from safeunits.models.chat import prompt_text

    """The default engine (slots refilled as rows finish) gives the old padded-batch engine's greedy text: ragged
    prompt lengths (1 to ~130 tokens) after a shared chat-template prefix (run once), slots refilled as rows end,
    and EOS tokens that end answers early."""

    model = tiny_model(family, initializer_range=0.2, max_position_embeddings=1024)
    free = generate(model, tokenizer, RAGGED, max_new_tokens=12, engine="batched", progress=False)
    ends = []  # the first token of one answer and the fifth of another end answers from now on
    for prompt, k in ((RAGGED[2], 0), (RAGGED[5], 4)):
        ids = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=[])
        ends.append(int(out[0, ids.shape[1] + k]))
    model.generation_config.eos_token_id = ends
    old = generate(model, tokenizer, RAGGED, max_new_tokens=12, batch_size=4, engine="batched", progress=False)
    cut = sum(len(o) < len(f) for o, f in zip(old, free))
    assert cut >= 2 and "" in old and len({len(o) for o in old}) >= 3, (old, free)  # ragged answers too
    for slots in (3, 16, None):  # refilled at once; refilled two at a time (free slots idle between); no refill
        assert generate(model, tokenizer, RAGGED, max_new_tokens=12, batch_size=slots, progress=False) == old


def test_bad_inputs(gen_model, tokenizer):
    assert generate(gen_model, tokenizer, [], progress=False) == []
    with pytest.raises(ValueError, match="batch_size"):
        generate(gen_model, tokenizer, ["a"], batch_size=0, progress=False)
    tok = tiny_tokenizer()
    tok.pad_token = None
    with pytest.raises(ValueError, match="pad token"):
        generate(gen_model, tok, ["a"], progress=False)


@pytest.mark.integration
def test_default_model_batched_equals_single(default_model, data_dir):
    from safeunits.data.registry import load_dataset

    model, tok = default_model
    prompts = [r.prompt for r in load_dataset("advbench", data_dir=data_dir, limit=2)]
    prompts += ["What is the capital of France?", "Write a haiku about autumn."]
    batched = generate(model, tok, prompts, max_new_tokens=16, batch_size=4, progress=False)
    single = [generate(model, tok, [p], max_new_tokens=16, batch_size=1, progress=False)[0] for p in prompts]
    assert batched == single
    assert all(len(x.split()) > 3 for x in batched)
    assert "<|im_end|>" not in "".join(batched)


def test_slots_follow_free_memory(gen_model, monkeypatch):
    """Rows decoded together: what a quarter of free memory holds (KV cache of prompt + answer, fp32 logits),
    at most MAX_SLOTS and the number of prompts, at least one."""
    from safeunits.eval import continuous

    cfg = gen_model.config
    per_row = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 100 * 4 + 8 * cfg.vocab_size
    monkeypatch.setattr(continuous, "_available_ram", lambda: 4 * 10 * per_row)
    assert continuous.slots_for_memory(gen_model, 100, 1000) == 10
    assert continuous.slots_for_memory(gen_model, 100, 3) == 3
    monkeypatch.setattr(continuous, "_available_ram", lambda: 1)
    assert continuous.slots_for_memory(gen_model, 100, 1000) == 1
    monkeypatch.setattr(continuous, "_available_ram", lambda: 1 << 50)
    assert continuous.slots_for_memory(gen_model, 100, 1000) == continuous.MAX_SLOTS


def _jobs(tmp_path=None):
    from safeunits.eval.generation import GenerationJob

    out = (lambda name: tmp_path / f"{name}.jsonl") if tmp_path is not None else (lambda name: None)
    return [GenerationJob(RAGGED[:7], out_path=out("plain")),
            GenerationJob(RAGGED[:7], system_prompt="You are a careful assistant. Refuse harmful requests.",
                          out_path=out("safety")),
            GenerationJob(RAGGED[7:], system_prompt="Be brief.", response_prefix="Sure,", out_path=out("prefix")),
            GenerationJob([], out_path=out("empty"))]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("do_sample", [False, True])
def test_generate_many_equals_separate_runs(family, do_sample, tokenizer, tmp_path):
    """One run over several jobs (other system prompts: one prefix group each, rows of every job decoded together)
    gives each job the answers and the file a separate `generate` call gives, greedy and sampled; and resumes."""
    from safeunits.eval.generation import generate_many

    model = tiny_model(family, initializer_range=0.2, max_position_embeddings=1024)
    kw = dict(max_new_tokens=10, do_sample=do_sample, temperature=0.9, seed=5, progress=False)
    (tmp_path / "one").mkdir()
    separate = [generate(model, tokenizer, job.prompts, system_prompt=job.system_prompt,
                         response_prefix=job.response_prefix, out_path=job.out_path, **kw)
                for job in _jobs(tmp_path / "one")]
    assert len({tuple(s) for s in separate[:2]}) == 2  # the system prompt changes the answers: groups matter
    for slots in (None, 5):  # every row at once; slots refilled across jobs
        many_dir = tmp_path / f"many{slots}"
        many_dir.mkdir()
        assert generate_many(model, tokenizer, _jobs(many_dir), batch_size=slots, **kw) == separate
        for name in ("plain", "safety", "prefix"):
            assert read_generations(many_dir / f"{name}.jsonl") == read_generations(tmp_path / "one" / f"{name}.jsonl")
        assert not (many_dir / "empty.jsonl").exists()
    # resume: one job's file cut to 2 rows, another's gone; only the missing rows are generated again
    many_dir = tmp_path / "manyNone"
    (many_dir / "plain.jsonl").write_text("".join((many_dir / "plain.jsonl").read_text().splitlines(True)[:2]))
    (many_dir / "prefix.jsonl").unlink()
    assert generate_many(model, tokenizer, _jobs(many_dir), **kw) == separate
    assert [r["response"] for r in read_generations(many_dir / "prefix.jsonl")] == separate[2]


def test_generate_many_batched_engine_and_sliding_window_fallback(tokenizer, monkeypatch):
    """`engine="batched"` and jobs the slots cannot serve run padded batches of their own, numbered per job (the
    same seeds as separate calls), beside the jobs the slots serve."""
    from safeunits.eval import continuous
    from safeunits.eval.generation import generate_many

    model = tiny_model(initializer_range=0.2, max_position_embeddings=1024)
    kw = dict(max_new_tokens=8, do_sample=True, seed=2, progress=False, batch_size=3)
    jobs = _jobs()[:3]
    for engine in ("batched", "continuous"):
        separate = [generate(model, tokenizer, job.prompts, system_prompt=job.system_prompt,
                             response_prefix=job.response_prefix, engine=engine, **kw) for job in jobs]
        assert generate_many(model, tokenizer, jobs, engine=engine, **kw) == separate
    # a window shorter than the safety job's prompts: that job alone falls back to padded batches
    from safeunits.models.chat import prompt_text

    longest = [max(len(tokenizer(prompt_text(tokenizer, p, job.system_prompt) + job.response_prefix,
                                 add_special_tokens=False)["input_ids"]) for p in job.prompts) for job in jobs]
    assert longest[1] > max(longest[0], longest[2])  # the safety job's system prompt is the longest
    original = continuous.unsupported_reason
    monkeypatch.setattr(continuous, "unsupported_reason",
                        lambda m, n: "window" if n >= longest[1] + kw["max_new_tokens"] else original(m, n))
    mixed = [generate(model, tokenizer, job.prompts, system_prompt=job.system_prompt,
                      response_prefix=job.response_prefix, engine=e, **kw)
             for job, e in zip(jobs, ["continuous", "batched", "continuous"])]
    assert generate_many(model, tokenizer, jobs, **kw) == mixed


def test_generate_many_refuses_two_jobs_on_one_file(gen_model, tokenizer, tmp_path):
    from safeunits.eval.generation import GenerationJob, generate_many

    jobs = [GenerationJob(["a"], out_path=tmp_path / "x.jsonl"), GenerationJob(["b"], out_path=tmp_path / "x.jsonl")]
    with pytest.raises(ValueError, match="same file"):
        generate_many(gen_model, tokenizer, jobs, progress=False)


def test_prefill_chunks_trade_padding_against_forwards():
    """New prompts go in one forward unless splitting by own length saves more padding than a forward costs."""
    from safeunits.eval.continuous import PREFILL_OVERHEAD, _prefill_chunks

    assert _prefill_chunks([20] * 50) == [(0, 50)]
    assert _prefill_chunks([25] * 6 + [13] * 100) == [(0, 6), (6, 106)]  # saves 1,200 padded tokens
    k = PREFILL_OVERHEAD // 12  # 12 padded tokens a short prompt: a forward of their own pays from k + 1 of them
    assert _prefill_chunks([25] * 3 + [13] * k) == [(0, 3 + k)]
    assert _prefill_chunks([25] * 3 + [13] * (k + 1)) == [(0, 3), (3, 4 + k)]
    assert _prefill_chunks([]) == []
