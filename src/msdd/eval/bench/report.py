"""The stdout tables of a `msdd bench` report."""

from __future__ import annotations


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _malloc(settings: dict | None) -> str:
    if settings is None:
        return "malloc as the environment has it"
    mmap = ("no mmap" if settings.get("mmap_max") == 0  # the runs before 2026-12-05 14:00 had no "mmap_max"
            else f"mmap {settings['mmap_threshold'] >> 20} MiB")
    return f"malloc tuned ({mmap}, trim {settings['trim_threshold'] >> 20} MiB)"


def _percent(row: dict) -> str:
    x = row.get("fraction_of_round_peak")
    return "-" if x is None else f"{100 * x:.1f}%"


def format_report(report: dict) -> str:
    """The stdout tables of a report."""
    source = report["model"] or f"preset {report['preset']}"
    lines = [
        f"msdd bench: {source}, {report['resolution']} px, batch {report['batch_size']}, {report['dtype']}, "
        f"compile {'on' if report['compile'] else 'off'}, {report['threads']} threads, "
        f"samples >= {report.get('min_time', 0):g} s, {_malloc(report.get('malloc'))}, {report['device']} "
        f"({report['machine']}); peak GFLOP/s: matmul {report['machine_peak_gflops']:.1f} (% peak: the higher of "
        f"the probes before and after the rounds; % rnd: each sample against a probe right after it), "
        f"3x3 conv {report['conv_peak_gflops']:.1f}",
        f"{'contender':<16} {'img/s':>9} {'ms/batch median [min, max]':>30} {'GFLOP/img':>10} {'GFLOP/s':>9} "
        f"{'% peak':>7} {'% rnd':>6} {'x student':>9} {'peak MiB':>9}",
    ]
    for r in report["contenders"]:
        if "error" in r:
            lines.append(f"{r['name']:<16} {r['error']}")
            continue
        ms = f"{r['seconds_median'] * 1e3:.1f} [{r['seconds_min'] * 1e3:.1f}, {r['seconds_max'] * 1e3:.1f}]"
        lines.append(f"{r['name']:<16} {r['img_per_s']:>9.3f} {ms:>30} {r['gflop_per_img']:>10.2f} "
                     f"{r['achieved_gflops']:>9.1f} {100 * r['fraction_of_peak']:>6.1f}% {_percent(r):>6} "
                     f"{_fmt(r.get('speed_vs_student'), '>9.3f')} {_fmt(r.get('peak_memory_mib'), '>9.1f')}")
    if report.get("pipeline"):
        gen = report["pipeline"]
        lines += ["", f"end to end: {gen['preset']} generator ({gen['steps']} steps, cfg {gen['guidance']:g}) "
                      f"+ decoder, per batch",
                  f"{'contender':<16} {'tokens':>6} {'generator s':>12} {'decoder s':>10} {'decoder share':>14} "
                  f"{'GFLOP gen + dec':>18}"]
        for r in report["contenders"]:
            if "decoder_share" in r:
                flops = f"{r['generator_gflop_per_img']:.0f} + {r['decoder_gflop_per_img']:.0f}"
                lines.append(f"{r['name']:<16} {r['generator_tokens']:>6} {r['generator_seconds_median']:>12.3f} "
                             f"{r['decoder_seconds_median']:>10.3f} {100 * r['decoder_share']:>13.1f}% {flops:>18}")
    table = report.get("resolution_table")
    if table:
        lines += ["", "decode cost against resolution (one stage more per doubling)",
                  f"{'px':>5} {'stages':>6} {'student GFLOP/img':>18} {'student img/s':>14} "
                  f"{'teacher GFLOP/img':>18} {'teacher img/s':>14} {'teacher/student time':>21}"]
        for row in table:
            st, te = row["student"], row["teacher"]
            ratio = st["img_per_s"] / te["img_per_s"]
            lines.append(f"{row['resolution']:>5} {row['num_stages']:>6} {st['gflop_per_img']:>18.2f} "
                         f"{st['img_per_s']:>14.3f} {te['gflop_per_img']:>18.2f} {te['img_per_s']:>14.3f} "
                         f"{ratio:>21.1f}")
    return "\n".join(lines)
