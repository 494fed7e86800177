"""`msdd fidelity`: the paper's Tables 2-3 and Figure 4 in miniature, on the embedded photographs, on a CPU.

Given a compute budget in minutes, it trains and evaluates (each number over `seeds` seeds, mean and
spread):

  a. teachers with 1 (single-scale), 3 and 4 stages at an equal total step budget (PSNR, SSIM, decode
     seconds per image);
  b. their one-step-per-stage students (same metrics, decoder passes per image);
  c. sweeps: the stage-1 guidance scale at decode time for the 4-stage teacher; the distillation
     guidance (distill.cfg 1 vs 2) for the 4-stage student; lambda_perc only when the LPIPS weights are
     available (offline it is reported as skipped, with the reason);
  d. baselines with the same number of latent floats: bicubic down/up, and a plain deterministic
     autoencoder (the same encoder and decoder network, one pass, MSE) trained for a teacher's budget;
  e. the SSDD family (ssdd-tiny-64: U-Net decoder, same token latent) teacher and its one-step student.

The budget is split over the training jobs in proportion to their weight (teachers and plain autoencoder
2, students 1); every job sizes its step count from a measured step time, so its LR schedule completes.
With `train_steps` / `distill_steps` (`--train-steps`, `--distill-steps`) every stage-1 job trains that
many steps and every student distils that many instead: equal training samples per job, the same
models on any machine (and under load), the measured training time of each job in the results.
Every family trains by the preset's recipe (with tiny-64: the PCA linear path, x-prediction, uniform
times; the SSDD family takes the linear path and x-prediction of its own flow, `ssdd.prediction`).
Results go to <out>/results.json and <out>/results.md with the exact command, machine, date and budget.
"""

from __future__ import annotations

import datetime
import json
import platform
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from msdd.config import Config, load_config, model_config_from_dict
from msdd.config.dicts import diff_fields
from msdd.data import embedded_eval_set
from msdd.train.budget import budgeted_config, budgeted_distill, fixed_steps
from msdd.eval.evaluate import evaluate
from msdd.eval.baselines import pca_baseline, pca_for_source
from msdd.eval.metrics import bicubic_baseline, bicubic_side, psnr_per_image, ssim_per_image
from msdd.hub import read_model_metadata
from msdd.tokenizer import Tokenizer
from msdd.train.distill import build_distiller
from msdd.train.stage1 import Stage1Trainer

# --quick: the 32 px toy versions of the default presets, so that the whole pipeline runs in about a minute.
QUICK_PRESETS = {"tiny-64": "tiny-test", "ssdd-tiny-64": "ssdd-tiny-test"}


def quick_preset(name: str) -> str:
    """The toy preset that --quick trains in place of `name`."""
    if name not in QUICK_PRESETS:
        raise ValueError(f"--quick trains the 32 px toy versions of {' and '.join(QUICK_PRESETS)} "
                         f"({', '.join(QUICK_PRESETS.values())}), not of {name!r}: leave out --preset, or drop "
                         f"--quick and shrink the model with --set")
    return QUICK_PRESETS[name]


STAGE_COUNTS = (1, 3, 4)  # the msdd teachers of Table 2: single-scale, 3 and 4 stages


def split_steps(total: int, stages: int) -> tuple[int, ...]:
    """`total` Euler steps over `stages` stages, the remainder going to the coarse stages (cheap)."""
    base, extra = divmod(total, stages)
    return tuple(base + (1 if stage < extra else 0) for stage in range(stages))


def teacher_config(base: Config, stages: int, total_steps: int, seed: int) -> Config:
    m = base.model
    model = replace(m, flow=replace(m.flow, num_stages=stages),
                    sampling=replace(m.sampling, steps=split_steps(total_steps, stages)))
    return replace(base, name=f"{base.name}-s{stages}", model=model, train=replace(base.train, seed=seed))


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


class Fidelity:
    def __init__(self, out: str | Path, minutes: float, preset: str = "tiny-64", overrides=(), seeds: int = 2,
                 total_steps: int = 40, quick: bool = False, device: str = "cpu",
                 ssdd_preset: str = "ssdd-tiny-64", ssdd_overrides=(), train_steps: int | None = None,
                 distill_steps: int | None = None) -> None:
        self.out, self.minutes, self.device = Path(out), minutes, device
        self.train_steps, self.distill_steps = train_steps, distill_steps
        if quick:  # the same table from toy models in about a minute
            preset, ssdd_preset = quick_preset(preset), quick_preset(ssdd_preset)
            seeds, minutes = 1, min(minutes, 0.3)
        self.base = load_config(preset, overrides)
        self.ssdd, self.ssdd_overrides = load_config(ssdd_preset, ssdd_overrides), list(ssdd_overrides)
        if total_steps < max(STAGE_COUNTS):  # checked before any job trains
            raise ValueError(f"--total-steps {total_steps}: the {max(STAGE_COUNTS)}-stage teacher needs at least one "
                             f"step per stage; pass {max(STAGE_COUNTS)} or more")
        for config, family, option in ((self.base, "msdd", "--preset / --set"), (self.ssdd, "ssdd", "--ssdd-set")):
            if config.model.family != family:
                raise ValueError(f"{option}: the fidelity table's {family} rows need a model of the {family!r} family, "
                                 f"got {config.name} of the {config.model.family!r} family")
        self.train_seconds: dict[str, float] = {}
        self.seeds, self.total_steps, self.quick, self.minutes = seeds, total_steps, quick, minutes
        self.images, self.names = embedded_eval_set(self.base.model.image_size)
        self.rows: list[dict] = []  # one per (experiment, variant, seed)
        teachers, students, plain = 4 * seeds, 4 * seeds + seeds, seeds  # 3 msdd + 1 ssdd; +1 student: cfg 2
        self.unit = minutes / (2 * teachers + students + 2 * plain)  # minutes per unit of job weight

    # ------------------------------------------------------------------ jobs

    def _finished(self, run: Path, config: Config) -> bool:
        """Whether `run` holds its finished model, which is then reused (a table resumed after a stop); one of other
        model settings (a --quick run's toy model, another --set) is an error, not a row of another model."""
        if not (run / "model" / "config.json").exists():
            return False
        stored = model_config_from_dict(read_model_metadata(run / "model")["model"])
        differ = diff_fields(replace(stored, one_step=False), replace(config.model, one_step=False), "model")
        if differ:
            raise ValueError(f"--out {self.out} holds {run.relative_to(self.out)}, a model of other settings than "
                             f"this table's ({'; '.join(differ[:3])}{' ...' if len(differ) > 3 else ''}): pass a new "
                             "--out, or the settings that made it")
        return True

    def train_teacher(self, config: Config, tag: str) -> Path:
        run = self.out / "runs" / tag
        if not self._finished(run, config):
            if self.train_steps:
                config = fixed_steps(config, stage1=self.train_steps)
            else:
                config, _ = budgeted_config(config, 2 * self.unit, self.device)
            self.train_seconds[tag] = Stage1Trainer(config, run, device=self.device).fit(progress=False)["seconds"]
        return run / "model"

    def distill(self, config: Config, teacher: Path, tag: str, guidance: float = 1.0) -> Path:
        run = self.out / "runs" / tag
        if not self._finished(run, config):
            config = replace(config, distill=replace(config.distill, cfg=guidance))
            if self.distill_steps:
                config = fixed_steps(config, distill=self.distill_steps)
            else:
                config, _ = budgeted_distill(config, teacher, self.unit, self.device)
            distiller = build_distiller(config, teacher, run, device=self.device)
            self.train_seconds[tag] = distiller.fit(progress=False)["seconds"]
        return run / "model"

    def measure(self, model: Path, experiment: str, variant: str, seed: int, **decode) -> dict:
        tok = Tokenizer.from_pretrained(model, device=self.device)
        r = evaluate(tok, "embedded", batch_size=42, model_path=model, pca_source=None, **decode)
        p = r["protocol"]
        row = {"experiment": experiment, "variant": variant, "seed": seed, "psnr": r["metrics"]["psnr"],
               "ssim": r["metrics"]["ssim"], "decode_s_per_img": r["decode_seconds_per_image"],
               "passes": p["decoder_passes_per_image"], "steps": p["steps_per_stage"], "cfg": p["cfg"]}
        self.rows.append(row)
        print(f"  {experiment:>10} {variant:<28} seed {seed}: PSNR {row['psnr']:.2f} SSIM {row['ssim']:.3f} "
              f"{row['passes']} passes {row['decode_s_per_img'] * 1000:.1f} ms/img", flush=True)
        return row

    # ------------------------------------------------------------------ the experiments

    def run(self) -> dict:
        t0 = time.monotonic()
        self.out.mkdir(parents=True, exist_ok=True)
        floats = self.base.model.latent_tokens * self.base.model.latent_dim
        bic = bicubic_baseline(self.images, floats)
        self.rows.append({"experiment": "baseline", "variant": f"bicubic {bicubic_side(floats)}px", "seed": 0,
                          "psnr": psnr_per_image(bic, self.images).mean().item(),
                          "ssim": ssim_per_image(bic, self.images).mean().item(), "decode_s_per_img": None,
                          "passes": 0, "steps": [], "cfg": None})
        pca = pca_baseline(pca_for_source("embedded", self.base.model.image_size, floats), self.images)
        self.rows.append({"experiment": "baseline", "variant": f"PCA {floats} components", "seed": 0,
                          "psnr": psnr_per_image(pca, self.images).mean().item(),
                          "ssim": ssim_per_image(pca, self.images).mean().item(), "decode_s_per_img": None,
                          "passes": 0, "steps": [], "cfg": None})
        for seed in range(self.seeds):
            for stages in STAGE_COUNTS:
                config = teacher_config(self.base, stages, self.total_steps, seed)
                name = "single-scale" if stages == 1 else f"{stages} stages"
                teacher = self.train_teacher(config, f"teacher-s{stages}-seed{seed}")
                self.measure(teacher, "teacher", name, seed)
                student = self.distill(config, teacher, f"student-s{stages}-seed{seed}")
                self.measure(student, "student", name, seed)
                if stages == 4:  # the same teacher at 30 steps per stage: 30x the student's passes
                    self.measure(teacher, "teacher-steps", "4 stages, 30 steps/stage", seed, steps=30)
                    for g in (1.5, 2.0, 3.0):
                        self.measure(teacher, "teacher-cfg", f"4 stages, cfg {g:g}", seed, guidance=g)
                    student2 = self.distill(config, teacher, f"student-s4-cfg2-seed{seed}", guidance=2.0)
                    self.measure(student2, "student-cfg", "4 stages, distill cfg 2", seed)
            plain = replace(self.base, model=replace(self.base.model, family="plain"),
                            train=replace(self.base.train, seed=seed))
            self.measure(self.train_teacher(plain, f"plain-seed{seed}"), "baseline", "plain autoencoder", seed)
            ssdd = replace(self.ssdd, train=replace(self.ssdd.train, seed=seed))
            teacher = self.train_teacher(ssdd, f"ssdd-teacher-seed{seed}")
            self.measure(teacher, "ssdd", "teacher", seed)
            self.measure(self.distill(ssdd, teacher, f"ssdd-student-seed{seed}"), "ssdd", "one-step student", seed)
        return self.report(time.monotonic() - t0)

    # ------------------------------------------------------------------ report

    def summary(self) -> list[dict]:
        groups: dict[tuple, list[dict]] = {}
        for r in self.rows:
            groups.setdefault((r["experiment"], r["variant"]), []).append(r)
        out = []
        for (exp, var), rs in groups.items():
            ms = [r["decode_s_per_img"] for r in rs if r["decode_s_per_img"] is not None]
            out.append({"experiment": exp, "variant": var, "seeds": len(rs),
                        "psnr": spread([r["psnr"] for r in rs]), "ssim": spread([r["ssim"] for r in rs]),
                        "decode_s_per_img": spread(ms) if ms else None, "passes": rs[0]["passes"],
                        "steps": rs[0]["steps"], "cfg": rs[0]["cfg"]})
        return out

    def report(self, seconds: float) -> dict:
        result = {
            "command": shlex.join(["msdd", "fidelity", *sys.argv[2:]]) if sys.argv[1:2] == ["fidelity"] else None,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                       f"{self.device}",
            "budget_minutes": None if self.train_steps else self.minutes,
            "train_steps": self.train_steps, "distill_steps": self.distill_steps,
            "train_seconds": self.train_seconds, "wall_minutes": round(seconds / 60, 1), "seeds": self.seeds,
            "preset": self.base.name, "quick": self.quick, "total_steps": self.total_steps,
            "eval_set": f"{len(self.names)} held-out images at {self.base.model.image_size} px (chelsea, rocket, "
                        "flower: whole photos + 2x2 and 3x3 tiles)",
            "lambda_perc_sweep": "skipped: LPIPS needs the VGG16 weights file (offline presets train without it)",
            "ssdd_recipe": f"{self.ssdd.name} with {self.ssdd_overrides}" if self.ssdd_overrides else
                           f"{self.ssdd.name} as it is, with its own SSDD settings (the README's table trains SSDD "
                           "by msdd's recipe: --ssdd-set "
                           "model.linear_path=true model.ssdd.prediction=x model.ssdd.t_sampling=uniform "
                           "train.linear_lr_scale=0 distill.lambda_pix=1)",
            "summary": self.summary(), "rows": self.rows,
        }
        result["goals"] = goals(result["summary"])
        (self.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        (self.out / "results.md").write_text(render_markdown(result))
        print(render_markdown(result))
        return result


def _fmt(stat: dict | None, digits: int) -> str:
    if stat is None:
        return "-"
    mean = f"{stat['mean']:.{digits}f}"
    return f"{mean} ± {stat['std']:.{digits}f}" if len(stat["values"]) > 1 else mean


def goals(summary: list[dict]) -> list[dict]:
    """The project's quality goals (issues 6 and 12), checked on the seed means of `summary`."""
    by = {(row["experiment"], row["variant"]): row for row in summary}
    bicubic = next((row for row in summary if row["variant"].startswith("bicubic")), None)
    t4, t3 = by.get(("teacher", "4 stages")), by.get(("teacher", "3 stages"))
    t30, s4 = by.get(("teacher-steps", "4 stages, 30 steps/stage")), by.get(("student", "4 stages"))
    pca = next((row for row in summary if row["variant"].startswith("PCA")), None)
    out = []
    if s4 and pca:  # issue 12: beat the best linear code with the same float count
        d = s4["psnr"]["mean"] - pca["psnr"]["mean"]
        out.append({"goal": "4-stage student PSNR >= PCA + 1 dB (same float count)", "measured": f"{d:+.2f} dB",
                    "met": d >= 1})
    if t4 and bicubic:
        d = t4["psnr"]["mean"] - bicubic["psnr"]["mean"]
        out.append({"goal": "4-stage teacher PSNR >= bicubic + 2 dB", "measured": f"{d:+.2f} dB", "met": d >= 2})
    for teacher, label in ((t4, "its 4-stage teacher"), (t30, "the teacher at 30 steps/stage")):
        if teacher and s4:
            dp = s4["psnr"]["mean"] - teacher["psnr"]["mean"]
            ds = s4["ssim"]["mean"] - teacher["ssim"]["mean"]
            ratio = teacher["passes"] / s4["passes"]
            out.append({"goal": f"student within 0.5 dB and 0.02 SSIM of {label} at >= 30x fewer passes",
                        "measured": f"{dp:+.2f} dB, {ds:+.3f} SSIM, {ratio:g}x fewer passes",
                        "met": dp >= -0.5 and ds >= -0.02 and ratio >= 30})
    if t4 and t3:
        d = t4["psnr"]["mean"] - t3["psnr"]["mean"]
        out.append({"goal": "4 stages >= 3 stages (teacher PSNR)", "measured": f"{d:+.2f} dB", "met": d >= 0})
    return out


def render_markdown(r: dict) -> str:
    lines = [
        f"# Fidelity experiments ({r['preset']}{', quick' if r['quick'] else ''})",
        "",
        f"- command: `{r['command']}`" if r["command"] else "- command: (library call)",
        f"- machine: {r['machine']}; date: {r['date']}",
        (f"- budget: {r['budget_minutes']} min" if r.get("budget_minutes") else
         f"- budget: {r['train_steps']} stage-1 steps, {r['distill_steps']} distillation steps per job")
        + f" (wall {r['wall_minutes']} min); seeds: {r['seeds']} (mean ± std over seeds)",
        f"- teachers share a total of {r['total_steps']} Euler steps; evaluation: {r['eval_set']}",
        f"- lambda_perc sweep: {r['lambda_perc_sweep']}",
        *([f"- SSDD rows: {r['ssdd_recipe']}"] if "ssdd_recipe" in r else []),
        "",
        "| experiment | variant | steps/stage | cfg | passes/img | PSNR (dB) | SSIM | decode ms/img |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["summary"]:
        ms = None if row["decode_s_per_img"] is None else {**row["decode_s_per_img"],
                                                           "mean": row["decode_s_per_img"]["mean"] * 1000,
                                                           "std": row["decode_s_per_img"]["std"] * 1000}
        lines.append(f"| {row['experiment']} | {row['variant']} | {row['steps'] or '-'} | "
                     f"{'-' if row['cfg'] is None else row['cfg']} | {row['passes']} | {_fmt(row['psnr'], 2)} | "
                     f"{_fmt(row['ssim'], 3)} | {_fmt(ms, 1)} |")
    if r.get("goals"):
        lines += ["", "| goal | measured (seed means) | met |", "|---|---|---|"]
        lines += [f"| {g['goal']} | {g['measured']} | {'yes' if g['met'] else 'no'} |" for g in r["goals"]]
    return "\n".join(lines) + "\n"
