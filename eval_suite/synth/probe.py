"""Per-task and per-question-type scores of a synthetic family's base, experts and a few merges.

``python -m eval_suite.synth.probe FAMILY_DIR [--limit 200] [--split val] [--models base,vqa,…]
[--merges task_arithmetic:0.3,weight_average:1] [--scale geometry]`` — the design probe behind the last section of
``eval_suite/SYNTH_RESULTS.md`` (merges in memory, as ``synth study`` does).
"""
import argparse, collections, json, tempfile
from pathlib import Path
import torch
torch.set_num_threads(1)
from eval_suite.synth.study import FamilyEvaluator, load_state, merge, SYNTH_TASK_NAMES
from eval_suite.synth.family import EXPERTS, family_paths
from eval_suite.synth.tasks import eval_items
from eval_suite.runner import evaluate_task
from eval_suite.tasks import make_task

ap = argparse.ArgumentParser(); ap.add_argument('family'); ap.add_argument('--limit', type=int, default=200)
ap.add_argument('--merges', default='task_arithmetic:0.3,task_arithmetic:0.5,task_arithmetic:1.0,weight_average:1')
ap.add_argument('--models', default='base,' + ','.join(EXPERTS))
ap.add_argument('--split', default='val')
ap.add_argument('--scale', default=None, metavar='EXPERT',
                help="also score base + α·τ_EXPERT on the expert's own task for α in --alphas")
ap.add_argument('--alphas', default='0,0.25,0.5,0.75,1,1.25')
a = ap.parse_args()
paths = family_paths(Path(a.family))
ev = FamilyEvaluator(paths['base'])
types = {t: {it.id: it.question_type for it in eval_items(t, a.split, a.limit)} for t in SYNTH_TASK_NAMES}
tmp = Path(tempfile.mkdtemp())
def run(name, sd):
    ev.model.load_state_dict(sd, strict=False)
    out = {}; per = {}
    for t in SYNTH_TASK_NAMES:
        p = tmp / f'{t}.jsonl'
        e = evaluate_task(ev.adapter, make_task(t, split=a.split), limit=a.limit, predictions_path=p)
        out[t] = e['score']
        agg = collections.defaultdict(list)
        for line in p.read_text().splitlines():
            r = json.loads(line); agg[types[t][r['id']]].append(r['score'])
        per[t] = {k: round(100 * sum(v) / len(v), 1) for k, v in sorted(agg.items())}
    avg = sum(out.values()) / 5
    print(f"{name:22s} " + ' '.join(f"{t[6:]}={out[t]:.1f}" for t in SYNTH_TASK_NAMES) + f"  avg={avg:.2f}", flush=True)
    print('    ' + ' | '.join(f"{t[6:]}:" + ','.join(f"{k}={v}" for k, v in per[t].items()) for t in SYNTH_TASK_NAMES), flush=True)
    return out
base = load_state(paths['base']); ex = {n: load_state(paths[n]) for n in EXPERTS}
for m in a.models.split(','):
    if m: run(m, base if m == 'base' else ex[m])
for spec in a.merges.split(','):
    if not spec: continue
    meth, lam = spec.split(':')
    run(spec, merge(meth, float(lam), base, ex))
if a.scale:
    from eval_suite.synth.tasks import CAPABILITIES
    own, expert = CAPABILITIES[a.scale], ex[a.scale]
    for alpha in (float(x) for x in a.alphas.split(',')):
        state = {k: base[k] + alpha * (expert[k] - base[k]) if base[k].is_floating_point() else base[k] for k in base}
        ev.model.load_state_dict(state, strict=False)
        score = evaluate_task(ev.adapter, make_task(own, split=a.split), limit=a.limit)['score']
        print(f"base + {alpha:g}·τ_{a.scale}: {own} = {score:.1f}", flush=True)
