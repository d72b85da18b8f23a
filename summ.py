import json, glob, statistics as st, sys
for d in sorted(glob.glob("/tmp/sq/study/*")):
    rows = []
    for s in (1, 2, 3):
        try: m = json.load(open(f"{d}/seed{s}/metrics.json"))
        except FileNotFoundError: continue
        rows.append((m["start"]["valid"]["ndcg@20"], m["valid"]["ndcg@20"], m["start"]["test"]["ndcg@20"], m["test"]["ndcg@20"], m["best_epoch"], [round(h["valid"]["ndcg@20"],4) for h in m["history"]], m["wall_time_s"]))
    if not rows: continue
    vg = [r[1]-r[0] for r in rows]; tg = [r[3]-r[2] for r in rows]
    print(d.split("/")[-1], "valid gain %.4f" % st.mean(vg), "test mean %.4f ± %.4f" % (st.mean(r[3] for r in rows), st.pstdev([r[3] for r in rows])), "test gain %.4f" % st.mean(tg), [r[4] for r in rows], "wall", [round(r[6]) for r in rows])
    for r in rows: print("   ", r[5])
