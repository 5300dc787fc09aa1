"""The K-distinct sampler that `alignloop sample` and the labeling app's sampler share."""
from __future__ import annotations

from alignloop.sample import distinct_answers


def test_distinct_answers_are_distinct_and_follow_the_seed(micro_run):
    from alignloop.engine import Engine
    from alignloop.model import load_for_inference
    from alignloop.tokenizer import ChatTokenizer
    tok = ChatTokenizer.load(micro_run / "tokenizer")
    model, device = load_for_inference(micro_run / "pretrain", "cpu", "auto")
    engine = Engine(model, tok, device)
    prompts = [tok.render_prompt([{"role": "user", "content": q}]) for q in
               ("What is 12 plus 7?", "Tell me about the forest.", "Reverse the word lantern.", "hi",
                "Which language do they speak in the north?", "Write one friendly sentence.")]

    def draw(seed, temperature, tries=3, k=4):
        return distinct_answers(engine, prompts, k, max_new_tokens=16, temperature=temperature, top_p=1.0,
                                tries=tries, seed=seed)
    hot = draw(5, 1.0)
    assert hot == draw(5, 1.0) and hot != draw(6, 1.0)       # the seed decides, and only the seed
    for answers in hot:
        assert len(answers) <= 4 and len(set(answers)) == len(answers) and all(a and a == a.strip() for a in answers)
    # Nearly greedy: the first draw repeats itself, the re-draws find more, never a duplicate.
    cold1, cold3 = draw(5, 0.05, tries=1), draw(5, 0.05, tries=3)
    assert sum(map(len, cold1)) < sum(map(len, cold3))
    assert all(a[:len(b)] == b for a, b in zip(cold3, cold1))   # a re-draw adds to what the first draw kept
    assert all(len(set(a)) == len(a) for a in cold3)
