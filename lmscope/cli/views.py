"""What each method command prints, and which Result(s) it writes to --json/--html/--png.

``view(name, result, config) -> (renderables, written)``; a method without an entry here prints its
ten largest and three smallest cells (:func:`lmscope.cli.common.top_table`) and writes its Result.
"""

from __future__ import annotations

from collections.abc import Mapping

from rich import box
from rich.table import Table

from lmscope.cli.common import top_table

NO_PLOT = ("circuit", "flow", "lens-train", "sae-train", "sae-eval", "sae-features",
           "sae-compare", "edit", "edit-eval", "edit-sequential", "recall", "attribute-evaluate")
SAE_SHOWN = ("l0", "fve", "gamma", "gamma_centred", "ce_recovered", "delta_ce", "dead_frac", "dense_frac", "tokens")


def token_table(result) -> Table:
    t = result.target or {}
    what = f"{t.get('target')!r}" + (f" vs {t['foil']!r}" if "foil" in t else "") if t else "last position"
    table = Table(title=f"{result.method} · {what}")
    for col in ("#", "token", "score"):
        table.add_column(col)
    for i, (label, value) in enumerate(zip(result.axes[0].labels, result.values.tolist())):
        table.add_row(str(i), repr(label), f"{value:+.4f}")
    return table


def generation_table(result) -> Table:
    table = Table(title=f"{result.method}: {result.meta['generated']!r}")
    for col in ("step", "token", "p", "top source"):
        table.add_column(col)
    for s, label in enumerate(result.axes[1].labels):
        col = result.values[:, s]
        best = int(col.nan_to_num(float("-inf")).argmax())
        table.add_row(str(s), repr(label), f"{float(result.extras['step_probability'][s]):.3f}",
                      f"{result.axes[0].labels[best]!r} ({float(col[best]):+.3f})")
    return table


def _attribute(result, config):
    shown = [generation_table(result) if config.generate is not None else token_table(result)]
    if "relative_delta" in result.meta:
        shown.append(f"completeness: relative delta {result.meta['relative_delta']:.3g} at {result.meta['steps']} "
                     f"steps (baseline {result.meta['baseline']})")
    return shown, result


def faithfulness_table(result) -> Table:
    """Methods ranked by comprehensiveness − sufficiency over all tasks (the attribute-evaluate Result)."""
    tasks, methods = result.axes[0].labels, result.axes[1].labels
    measure = {m: i for i, m in enumerate(result.axes[2].labels)}
    v = result.values
    table = Table(title=f"attribution faithfulness · erasure by {result.meta['replacement']} · "
                        "AOPC in logit-difference units")
    for col in ("#", "method", *(f"{t} comp−suff" for t in tasks[:-1]), "comp", "suff", "comp−suff",
                "ρ model rand.", "ρ target rand."):
        table.add_column(col)
    order = sorted(range(len(methods)), key=lambda m: -float(v[-1, m, measure["comp-suff"]]))
    for rank, m in enumerate(order, 1):
        cells = [f"{float(v[t, m, measure['comp-suff']]):+.3f}" for t in range(len(tasks) - 1)]
        cells += [f"{float(v[-1, m, measure[k]]):+.3f}" for k in ("comprehensiveness", "sufficiency", "comp-suff")]
        cells += ["–" if v[-1, m, measure[k]].isnan() else f"{float(v[-1, m, measure[k]]):.2f}"
                  for k in ("rho_model_random", "rho_target_random")]
        table.add_row(str(rank), methods[m], *cells)
    return table


def _evaluate(result, config):
    counts = ", ".join(f"{t}: {d['prompts']} prompts ({d['accuracy']:.0%} with target > foil)"
                       for t, d in result.meta["tasks"].items())
    notes = [f"{m} on {d['prompts']} prompts in all (random on the same prompts: comp−suff "
             f"{d['random_comp_suff']:+.3f})" for m, d in result.meta.get("subsets", {}).items()]
    if "integrated-gradients" in result.axes[1].labels:
        counts += f"; IG's worst relative completeness error {result.meta['ig_worst_relative_delta']:.3g}"
    return [faithfulness_table(result), counts, *notes], result


def _dla(result, config):
    meta = result.meta
    capped = f", {meta['model_value']:.3f} after the soft-cap" if meta["softcap"] is not None else ""
    return [top_table(result, 10, f"DLA of {meta['metric']} (model: {meta['metric_value']:.3f}{capped}, "
                                  f"constant {meta['constant']:.3f})")], result


def _patch(result, config):
    meta = result.meta
    return [top_table(result, 10, f"{result.method} of {config.site} (clean {meta['clean_metric']:.3f}, corrupt "
                                  f"{meta['corrupt_metric']:.3f}; {'normalised' if config.normalise else 'raw'})")], result


def _trace(result, config):
    meta = result.meta
    return [top_table(result, 10, f"Causal trace ({config.kind}) of {result.target['target']!r}: clean p="
                                  f"{meta['clean_prob']:.3f}, noised p={meta['corrupt_prob']:.3f}")], result


def _atp(result, config):
    from lmscope.errors import InputError

    if config.node not in result:
        raise InputError(f"--node {config.node!r}: choose one of {sorted(result)}.")
    res = result[config.node]
    shown = [top_table(res, 10, f"{res.method.upper()} ({res.params['direction']}) by {config.node}: clean "
                                f"{res.meta['clean_metric']:.3f}, corrupt {res.meta['corrupt_metric']:.3f}")]
    if "mlp" in result and config.node != "mlp":
        shown.append(top_table(result["mlp"], 5, "MLP layers"))
    if "head_check" in result:
        shown.append(head_check_table(result["head_check"]))
    return shown, res


def head_check_table(check) -> Table:
    """The heads with the largest exact effects and those whose AtP sign is wrong, with the rank
    correlations (the ``head_check`` member of ``atp --exact``)."""
    meta = check.meta
    table = Table(title=f"AtP against exact head patching ({check.params['direction']}, {check.params['n_prompts']} "
                        f"prompts): Spearman {meta['spearman']:.3f}, |AtP| vs |exact| {meta['spearman_abs']:.3f}, "
                        f"GradDrop vs |exact| {meta.get('spearman_graddrop_abs', float('nan')):.3f}")
    for col in ("head", "exact", "AtP", "GradDrop", "rank exact", "rank |AtP|", "rank GradDrop", "AtP sign"):
        table.add_column(col)
    wrong = {r["head"] for r in meta["wrong_sign"]}
    top = {t["head"] for t in meta["top_exact"]}
    rows = meta["top_exact"] + [r for r in meta["wrong_sign"] if r["head"] not in top]
    for r in rows:
        table.add_row(r["head"], f"{r['exact']:+.3f}", f"{r['atp']:+.3f}", f"{r.get('graddrop', float('nan')):.3f}",
                      str(r["rank_exact"]), str(r["rank_atp"]), str(r.get("rank_graddrop", "–")),
                      "wrong" if r["head"] in wrong else "ok")
    return table


def _circuit(result, config):
    meta = result.meta
    table = Table(title=f"{config.method.upper()} circuit for {meta.get('task')}: {len(result.axes[0])} of "
                        f"{meta['graph_edges']} edges, faithfulness {meta['faithfulness']:.3f} (logit diff clean "
                        f"{meta['clean_metric']:.3f}, corrupt {meta['corrupt_metric']:.3f})")
    for col in ("source", "target", "score"):
        table.add_column(col)
    for e in meta["edges"][:15]:
        table.add_row(e["source"], e["target"], f"{e['score']:+.4f}")
    shown = [f"[yellow]note:[/] {meta['note']}"] if "note" in meta else []
    shown.append(table)
    if "curve" in meta:
        ct = Table(title="Faithfulness against circuit size (complement patched)")
        for col in ("edges", "fraction", "kept", "faithfulness"):
            ct.add_column(col)
        c = meta["curve"]
        for n, frac, kept, f in zip(c["n_edges"], c["fraction"], c["kept"], c["faithfulness"]):
            ct.add_row(str(n), f"{frac:.4f}", str(int(kept)), f"{f:.3f}")
        shown.append(ct)
    if "mib" in meta:
        mt = Table(title="MIB circuit scores (areas over the fraction of edges): CMD ↓ by |score|, CPR ↑ by support")
        for col in ("scores", "CMD", "CPR"):
            mt.add_column(col)
        mib = meta["mib"]
        mt.add_row(config.method, f"{mib['cmd']:.3f}", f"{mib['cpr']:.3f}")
        mt.add_row("random", f"{mib['random_cmd']:.3f}", f"{mib['random_cpr']:.3f}")
        shown.append(mt)
    return shown, result


def _flow(result, config):
    edges, tokens, pos = result.meta["edges"], result.meta["tokens"], result.meta["position"]
    table = Table(title=f"Route into position {pos} ({tokens[pos]!r}): {len(result.meta['nodes'])} nodes, "
                        f"{len(edges)} edges at τ = {config.threshold}")
    for col in ("source", "target", "weight", "kind"):
        table.add_column(col)
    cross = sorted((e for e in edges if e["kind"] == "attn" and e["source"].split("_")[1] != e["target"].split("_")[1]),
                   key=lambda e: -e["weight"])
    for e in cross[:15]:
        src_pos = int(e["source"].split("_")[1])
        table.add_row(f"{e['source']} ({tokens[src_pos]!r})", e["target"], f"{e['weight']:.3f}", e["kind"])
    return [table], result


def _flow_node(result, config):
    """One row per token (logit lens), head or neuron; each rank appears once."""
    p, meta = result.params, result.meta
    where = f"layer {p['layer']}, position {p['position']} ({meta['tokens'][p['position']]!r})"
    if p["component"] == "attn_heads":
        table = Table(title=f"flow-node: heads of {where}")
        for col in ("head", "share into this position", "promotes", "suppresses"):
            table.add_column(col)
        shares = result.values[:, p["position"]].sum(-1)
        for h, label in enumerate(result.axes[0].labels):
            table.add_row(label, f"{float(shares[h]):.3f}", " ".join(repr(t) for t, _ in meta["promotes"][h][:4]),
                          " ".join(repr(t) for t, _ in meta["suppresses"][h][:4]))
        return [table], result
    if p["component"] == "mlp_neurons":
        table = Table(title=f"flow-node: top neurons of the FFN at {where}")
        for col in ("neuron", "share", "activation", "promotes", "suppresses"):
            table.add_column(col)
        for i, label in enumerate(result.axes[0].labels):
            table.add_row(label, f"{float(result.values[i]):.3f}", f"{float(result.extras['activation'][i]):+.3f}",
                          " ".join(repr(t) for t, _ in meta["promotes"][i][:4]),
                          " ".join(repr(t) for t, _ in meta["suppresses"][i][:4]))
        return [table], result
    table = Table(title=f"flow-node: logit lens of {p['component']} at {where}")
    for col in ("rank", "token", "probability", "rank before"):
        table.add_column(col)
    for i, (rank, tok) in enumerate(zip(result.axes[0].labels, meta["top_tokens"])):
        table.add_row(rank, repr(tok), f"{float(result.values[i]):.3f}", str(int(result.extras["rank_before"][i])))
    shown = [table]
    if "target" in meta:
        t = meta["target"]
        shown.append(f"target {t['token']!r}: probability {t['prob']:.3f}, rank {t['rank_before']} → {t['rank']}")
    return shown, result


def _flow_verify(result, config):
    clean, graph, none, faith = result.values.tolist()
    meta, t = result.meta, result.target
    what = f"{t['target']!r}" + (f" vs {t['foil']!r}" if "foil" in t else "")
    table = Table(title=f"flow-verify: {meta['metric']} of {what} at position {meta['position']}, "
                        f"{meta['ablation']} ablation outside the graph (τ = {config.threshold})")
    for col in ("clean", "graph only", "nothing", "faithfulness", "blocks kept"):
        table.add_column(col)
    table.add_row(f"{clean:+.3f}", f"{graph:+.3f}", f"{none:+.3f}", "–" if faith != faith else f"{faith:.3f}",
                  f"{100 * meta['kept_fraction']:.1f}%")
    return [table], result


def _tokens(pairs, n: int = 5) -> str:
    return " ".join(repr(t) for t, _ in pairs[:n])


def _head_inspect(result, config):
    t, meta = result.target, result.meta
    pos, tokens = t["position"], meta["tokens"]
    table = Table(title=f"head-inspect: L{t['layer']} H{t['head']} at position {pos} ({tokens[pos]!r})")
    for col in ("key", "attention", "OV promotes", "OV suppresses"):
        table.add_column(col)
    row = result.values[pos]
    for j in row.argsort(descending=True)[:8].tolist():
        ov = meta["ov"][meta["ov_index"][j]]
        table.add_row(f"{j}:{tokens[j]!r}", f"{float(row[j]):.3f}", _tokens(ov["promotes"]), _tokens(ov["suppresses"]))
    return [table, f"its write promotes {_tokens(meta['write']['promotes'])}; suppresses "
                   f"{_tokens(meta['write']['suppresses'])}",
            f"best-matching keys of {tokens[pos]!r} (QK, weights only): {_tokens(meta['qk_top'])}"], result


def _patch_cell(result, config):
    m = result.meta
    return [f"patch-cell: clean {m['clean_tokens'][m['position']]!r} (position {m['position']}) into the corrupted "
            f"prompt at position {m['to_position']}, layer {m['layer']}: {m['metric']} {m['corrupt']:+.3f} → "
            f"{m['patched']:+.3f} (clean {m['clean']:+.3f}); normalised effect {m['effect']:.3f}",
            top_table(result, 10, "relative change of the residual stream (layer, position); zero outside the "
                                  "causal cone")], result


def _sae_prompt(result, config):
    m = result.meta
    table = Table(title=f"SAE features at position {m['position']} ({m['tokens'][m['position']]!r}): {m['arch']} on "
                        f"{m['site']}, {m['active']} of {m['d_sae']} active")
    cols = ["latent", "activation", "promotes", "suppresses"] + (["top context"] if config.contexts else [])
    for col in cols:
        table.add_column(col)
    for f, v in zip(m["features"], result.values.tolist()):
        ctx = [f["contexts"][0]["text"] if f.get("contexts") else ""] if config.contexts else []
        table.add_row(str(f["latent"]), f"{v:.3f}", _tokens(f["promoted"]), _tokens(f["suppressed"]), *ctx)
    return [table], result


def lens_table(result) -> Table:
    """Table of a one-position lens view (:func:`lmscope.decoding.lens_top`)."""
    pos = result.meta["position"]
    name = "Tuned lens" if result.method == "tuned_lens" else "Logit lens"
    table = Table(title=f"{name} at position {pos} ({result.meta['tokens'][pos]!r})")
    table.add_column("layer")
    table.add_column("top tokens (probability)")
    if "target_prob" in result.extras:
        table.add_column(f"{result.target['target']!r} rank / prob")
    for i, label in enumerate(result.axes[0].labels):
        tops = ", ".join(f"{t!r} {p:.2f}" for t, p in zip(result.meta["top_tokens"][i], result.values[i].tolist()))
        row = [label, tops]
        if "target_prob" in result.extras:
            row.append(f"{int(result.extras['target_rank'][i])} / {float(result.extras['target_prob'][i]):.3f}")
        table.add_row(*row)
    return table


def _lens(result, config):
    from lmscope.decoding.logit_lens import lens_top

    return [lens_table(lens_top(result, config.position))], result


def eval_table(result) -> Table:
    table = Table(title=f"Held-out lens quality ({result.params['tokens']} tokens; model CE "
                        f"{result.meta['ce_model']:.3f} nats)")
    for col in ("layer", "KL logit", "KL tuned", "CE logit", "CE tuned"):
        table.add_column(col)
    for label, row in zip(result.axes[0].labels, result.values.tolist()):
        table.add_row(label, *(f"{v:.3f}" for v in row))
    return table


def _lens_train(result, config):
    info = result.meta["lens"]
    shown = [f"wrote {info['path']} ({info['tokens_seen']} tokens, {info['steps']} steps, "
             f"{info['world_size']} process(es))"]
    if result.method == "lens_eval":
        shown.append(eval_table(result))
    return shown, result


def _lens_eval(result, config):
    return [eval_table(result)], result


def _patchscope(result, config):
    if config.sweep:
        table = Table(title=f"Patchscope sweep: probability of {result.target['expected']!r} "
                            "(rows: source layer, columns: every 5th target layer; top-1 token)")
        table.add_column("source layer")
        cols = list(range(0, len(result.axes[1]), 5))
        for c in cols:
            table.add_column(f"→{result.axes[1].labels[c]}")
        for i, label in enumerate(result.axes[0].labels):
            table.add_row(label, *[f"{result.values[i, c]:.2f} {result.meta['top_tokens'][i][c]!r}" for c in cols])
    else:
        table = Table(title=f"Patchscope: {result.target['source']!r} layer {config.layer} pos "
                            f"{result.meta['source_position']} → target layer {result.params['target_layer']} pos "
                            f"{result.meta['target_position']}")
        for col in ("rank", "token", "probability"):
            table.add_column(col)
        for r, (t, p) in enumerate(zip(result.meta["top_tokens"], result.values.tolist()), 1):
            table.add_row(str(r), repr(t), f"{p:.3f}")
    shown = [table]
    if "generated" in result.meta:
        shown.append(f"generated: {result.meta['generated']!r}")
    return shown, result


def _patchscope_eval(result, config):
    title = (f"Patchscope {result.meta['task']} ({result.params['n']} sources"
             + (f", {result.params['generate']} generated tokens" if result.params["generate"] else ", next token")
             + f"): accuracy; direct reading (unpatched) {result.meta['direct']:.2f}")
    table = Table(title=title)
    if result.values.ndim == 1:
        for col in ("layer (ℓ* = ℓ)", "accuracy"):
            table.add_column(col)
        for label, v in zip(result.axes[0].labels, result.values.tolist()):
            table.add_row(label, f"{v:.2f}")
        return [table], result
    table.add_column("source layer")
    cols = list(range(0, len(result.axes[1]), max(1, len(result.axes[1]) // 8)))
    for c in cols:
        table.add_column(f"→{result.axes[1].labels[c]}")
    for i, label in enumerate(result.axes[0].labels):
        table.add_row(label, *[f"{result.values[i, c]:.2f}" for c in cols])
    shown = [table]
    if "map_r2" in result.extras:
        r2 = result.extras["map_r2"]
        shown.append(f"maps from {result.params['source_model']}: held-out R² {float(r2.min()):.2f} to "
                     f"{float(r2.max()):.2f}")
    return shown, result


def _caa(result, config):
    m = result.meta
    table = Table(title=f"CAA on {m['behaviour']}: P(matching letter) on {m['n_test']} held-out questions "
                        f"(vectors from {m['n_train']}; unsteered {m['unsteered']:.3f}) per multiplier; shift = "
                        "largest − smallest multiplier; v/h = ‖v‖ / ‖h‖", box=box.SIMPLE, pad_edge=False,
                  collapse_padding=True)
    multipliers = result.axes[1].labels
    digits = 3 if len(multipliers) <= 6 else 2  # a wide sweep still fits 80 columns
    for col in ("layer", *(f"{float(m):g}" for m in multipliers), "shift", "v/h"):
        table.add_column(col, no_wrap=True)
    ratio = result.extras["vector_norm"] / result.extras["resid_norm"]
    for i, label in enumerate(result.axes[0].labels):
        shift = float(result.extras["shift"][i])
        table.add_row(label, *[f"{v:.{digits}f}" for v in result.values[i].tolist()], f"{shift:+.{digits}f}",
                      f"{float(ratio[i]):.2f}")
    best = int(result.extras["shift"].argmax())
    return [table, f"largest shift at layer {result.axes[0].labels[best]}: "
                   f"{float(result.extras['shift'][best]):+.3f}"], result


def _probe(result, config):
    table = Table(title=f"{config.kind} probe on {result.meta['dataset']} ({result.meta.get('n_examples', '')} "
                        f"examples, {config.site}, position {config.position}); majority baseline "
                        f"{result.meta['majority_baseline']:.3f}")
    for col in ("layer", "accuracy", "± std", "control", "selectivity"):
        table.add_column(col)
    for i, label in enumerate(result.axes[0].labels):
        acc, ctrl, sel = result.values[i].tolist()
        table.add_row(label, f"{acc:.3f}", f"{float(result.extras['accuracy_std'][i]):.3f}", f"{ctrl:.3f}",
                      f"{sel:+.3f}")
    return [table], result


def _steer(result, config):
    from rich.text import Text

    prompt, texts = result.meta["prompt"], result.meta["texts"]
    return [Text.assemble(("unsteered: ", "bold"), prompt + texts[0]),
            Text.assemble((f"steered ({config.method}, layer {config.layer}, scale {config.scale}): ", "bold"),
                          prompt + texts[1])], result


def _project(result, config):
    shown = []
    if "neuron" in result:
        res = result["neuron"]
        table = Table(title=f"Neuron {config.neuron}: tokens its output direction promotes / suppresses")
        table.add_column("side")
        table.add_column("tokens (direct logit per unit activation)")
        for i, side in enumerate(res.axes[0].labels):
            table.add_row(side, ", ".join(f"{t!r} {v:+.2f}" for t, v in zip(res.meta["tokens"][i], res.values[i].tolist())))
        return [table], dict(result)
    for key, title in (("ov", "OV circuit: tokens promoted when attending to"), ("qk", "QK circuit: keys matched by")):
        res = result[key]
        table = Table(title=f"Head {config.head} {title} each token")
        table.add_column("token")
        table.add_column("top tokens")
        for i, label in enumerate(res.axes[0].labels):
            table.add_row(repr(label), ", ".join(repr(t) for t in res.meta["top_tokens"][i]))
        shown.append(table)
    return shown, dict(result)


def _sae_train(result, config):
    last = dict(zip(result.axes[1].labels, result.values[-1].tolist()))
    return [f"trained {config.arch} SAE on {result.params['site']}: L0 {last['l0']:.1f}, FVE {last['fve']:.3f}; "
            f"wrote {config.out_dir}"], result


def _edit(result, config):
    meta, v = result.meta, result.values
    lines = [f"ROME edit at layer {meta['layer']}" + (" (chosen by causal tracing)" if meta["traced"] else "")
             + f": v* after {meta['v_steps']} steps, |delta| {meta['delta_norm']:.3g}"]
    for j, label in enumerate(result.axes[1].labels):
        lines.append(f"  P({label!r}): {float(v[0, j]):.4f} before -> {float(v[1, j]):.4f} after")
    if meta["saved"]:
        lines.append(f"edit saved to {meta['saved']} (apply it with lmscope.editing.load_edit and model.edit)")
    return lines, result


def _edit_eval(result, config):
    s = result.meta["summary"]
    lines = [f"ROME on {result.meta['facts']} counterfactual facts at layer {result.meta['layer']} (before -> after):"]
    for m in ("efficacy", "paraphrase", "specificity", "efficacy_acc", "paraphrase_acc", "specificity_acc", "score",
              "fluency", "consistency", "mentions_old"):
        if m in s:
            lines.append(f"  {m:16s} {s['pre_' + m]:.3f} -> {s[m]:.3f}")
    return lines, result


def _edit_sequential(result, config):
    lines = [f"sequential ROME: {len(result.meta['facts'])} edits kept at layer {result.meta['layer']}"]
    for label, row in zip(result.axes[0].labels, result.values.tolist()):
        shown = ", ".join(f"{m} {v:.3f}" for m, v in zip(result.axes[1].labels, row))
        lines.append(f"  after {label:>4} edits: {shown}")
    return lines, result


def _recall(result, config):
    s = result.meta
    lines = [f"memorised vs in-context recall on {s['facts']} facts: in-context answer wins "
             f"{s['in_context_wins']:.3f}, "
             f"memorised {s['memorised_wins']:.3f} (top-1: in-context {s['top1_in_context']:.3f}, memorised "
             f"{s['top1_memorised']:.3f}, other {s['top1_other']:.3f})"]
    ko = result["knockout"]
    for i, target in enumerate(ko.axes[0].labels):
        col = ko.values[i, :, 0]
        layer = int(col.argmin())
        lines.append(f"  knockout last -> {target}: P(in-context) falls most at layer {layer} "
                     f"({float(col[layer]):+.3f})")
    pl = result["patch_layers"]
    for i, comp in enumerate(pl.axes[0].labels):
        layer = int(pl.values[i].argmax())
        lines.append(f"  patching {comp} at the last position: recovery peaks at layer {layer} "
                     f"({float(pl.values[i, layer]):.3f})")
    if "patch_heads" in result:
        ph = result["patch_heads"].values
        top = ph.flatten().argsort(descending=True)[:5].tolist()
        lines.append("  top heads: " + ", ".join(f"{i // ph.shape[1]}.{i % ph.shape[1]} ({float(ph.flatten()[i]):.3f})"
                                                  for i in top))
    return lines, result


def _heads(result, config):
    from lmscope.behaviors.heads import atlas_grid

    rep = result.meta["repeated_tokens"]
    table = Table(title=f"Head atlas of {result.model}: top heads per role")
    for col in ("role", "top heads (score)"):
        table.add_column(col)
    for role, tops in result.meta["top_heads"].items():
        table.add_row(role, ", ".join(f"{h} {v:.3f}" for h, v in tops))
    note = (f"[BOS] R R with n = {rep['n']}: loss {rep['loss_first_copy']:.2f} on the first copy, "
            f"{rep['loss_second_copy']:.2f} on the second (induction chance ≈ {rep['chance_induction']:.3f})")
    return [table, note], {"grid": atlas_grid(result), "atlas": result}


def sae_metrics_table(rows: list[tuple[str, list[float]]], metrics, title: str) -> Table:
    table = Table(title=title)
    table.add_column("sae")
    for m in SAE_SHOWN:
        table.add_column(m)
    for label, values in rows:
        vals = dict(zip(metrics, values))
        table.add_row(label, *(f"{vals[m]:.4g}" for m in SAE_SHOWN))
    return table


def _undefined_notes(label: str, undefined: dict) -> list[str]:
    """Why a shown metric is NaN (recorded by the evaluation in ``meta["undefined"]``)."""
    return [f"note: {m} of {label} is undefined (nan): {why}." for m, why in undefined.items() if m in SAE_SHOWN]


def _sae_eval(result, config):
    label = result.meta.get("folder", "")
    title = f"{result.params.get('arch')} SAE on {result.params.get('site')} ({result.model})"
    return [sae_metrics_table([(label, result.values.tolist())], result.axes[0].labels, title),
            *_undefined_notes(label, result.meta.get("undefined", {}))], result


def _sae_features(result, config):
    table = Table(title=f"SAE features: {result.params['arch']} on {result.params['site']} ({result.model})")
    for col in ("latent", "density", "top context"):
        table.add_column(col)
    for f in result.meta["features"]:
        table.add_row(str(f["latent"]), f"{f['density']:.2e}", f["contexts"][0]["text"] if f["contexts"] else "")
    return [table] + ([f"wrote {config.html}"] if config.html else []), result


def _sae_compare(result, config):
    labels = result.axes[0].labels
    shown = [sae_metrics_table(list(zip(labels, result.values.tolist())), result.axes[1].labels, "SAE comparison")]
    for label in labels:
        shown += _undefined_notes(label, result.meta.get("undefined", {}).get(label, {}))
    return shown + ([f"wrote {config.png}"] if config.png else []), result


VIEWS = {"edit": _edit, "edit-eval": _edit_eval, "edit-sequential": _edit_sequential, "recall": _recall,
         "attribute-evaluate": _evaluate,
         "attribute": _attribute, "dla": _dla, "patch": _patch, "trace": _trace, "atp": _atp, "circuit": _circuit,
         "flow": _flow, "flow-node": _flow_node, "flow-verify": _flow_verify,
         "head-inspect": _head_inspect, "patch-cell": _patch_cell, "sae-prompt": _sae_prompt, "lens": _lens,
         "lens-train": _lens_train, "lens-eval": _lens_eval, "patchscope": _patchscope,
         "patchscope-eval": _patchscope_eval, "caa": _caa,
         "probe": _probe, "steer": _steer, "project": _project, "sae-train": _sae_train,
         "sae-eval": _sae_eval, "sae-features": _sae_features, "sae-compare": _sae_compare, "heads": _heads}


def view(name: str, result, config):
    """(renderables to print, Result or {name: Result} to write)."""
    if name in VIEWS:
        return VIEWS[name](result, config)
    if isinstance(result, Mapping):
        return [repr(result)], dict(result)
    return [top_table(result, 10, f"{result.method} ({result.model})")], result
