"""Eval-style multi-key needle check at ~7.6K tokens with our own keys and values (not the eval
samples): 4 needles with different keys, ask for one; 6 cases; one prefill per case shared by
all policies.  python benchmarks/experiments/long8k_needles.py full quest src/flashmemory/indexer/default runs/long8k/ix-222324
"""
import sys
from flashmemory import LSAConfig, LSAEngine, load_backbone
from flashmemory.eval.haystack import essay_text
from flashmemory.policies import make_policy

TEMPLATE = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the numbers afterwards.\n{context}\n{question}")
KEYS = [("copper-lantern", "5820391"), ("silent-harbor", "7146028"), ("amber-falcon", "3958172"), ("frozen-meadow", "6603481")]
backbone = load_backbone(None); tok = backbone.tokenizer
hay_all = tok.decode(tok(essay_text())["input_ids"][:7400])
ok = {p: 0 for p in sys.argv[1:]}
n = 0
for target, depth in [(0, 0.2), (1, 0.45), (2, 0.65), (3, 0.85), (1, 0.3), (2, 0.55)]:
    hay = hay_all
    depths = [0.15, 0.4, 0.6, 0.8]
    depths[target] = depth
    for (k, v), d in sorted(zip(KEYS, depths), key=lambda x: -x[1]):
        cut = hay.index(". ", int(len(hay) * d)) + 2
        hay = hay[:cut] + f"One of the special magic numbers for {k} is: {v}. " + hay[cut:]
    key, val = KEYS[target]
    prompt = TEMPLATE.format(context=hay, question=f"What is the special magic number for {key} mentioned in the provided text?")
    engine = LSAEngine(backbone, LSAConfig(budget=0.12))
    ids = engine.encode(prompt, chat=True) + tok(f"The special magic number for {key} is:", add_special_tokens=False)["input_ids"]
    pre = engine.prefill(ids, max_new_tokens=16)
    n += 1
    line = []
    for p in sys.argv[1:]:
        pol = make_policy(p) if p in ("full", "quest") else make_policy("lsa", checkpoint=p)
        r = engine.decode(pre, pol, 12)
        hit = val in r.text
        ok[p] += hit
        line.append(f"{p.split('/')[-1]}={'Y' if hit else 'n'}({100*r.report.resident_fraction_max:.0f}%)")
    print(len(ids), key, depth, " ".join(line), flush=True)
print({k.split('/')[-1]: f"{v}/{n}" for k, v in ok.items()})
