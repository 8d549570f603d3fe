"""Step distillation of diffusion and flow models, tested against the exact Gaussian-mixture teacher:
the processes against diffusers' schedulers, the exact denoiser against naive densities, each
method's target against exact DDIM / ODE steps, the DMD gradient on a 1-D Gaussian in closed form,
diffusers folders, exact resume and the bad inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from distillery.config import TrainConfig
from distillery.data.core import TensorData
from distillery.diffusion.mixture import ExactDenoiser, GaussianMixture, gaussian_flow, named
from distillery.diffusion.process import Process, full
from distillery.errors import DistilleryError

diffusers = pytest.importorskip("diffusers")

from distillery.diffusion import distill as D  # noqa: E402
from distillery.diffusion import metrics as M  # noqa: E402
from distillery.diffusion.methods import (  # noqa: E402
    ConsistencyFn,
    ConsistencyTask,
    ProgressiveTask,
    ScorePair,
    ScoreTask,
    dmd_gradient,
)
from distillery.diffusion.nets import Denoiser, MLPDenoiser, load_folder, save_folder, unet  # noqa: E402
from distillery.diffusion.sample import lcm_scalings, sample  # noqa: E402

PROCESSES = [Process("vp", "epsilon"), Process("vp", "v_prediction", beta_schedule="linear"), Process("vp", "sample"),
             Process("flow", "flow"), Process("flow", "sample")]


def _mix_data(n=512, seed=0, labelled=False):
    mix = named("mixture2d")
    x, y = mix.sample(n, torch.Generator().manual_seed(seed))
    return mix, TensorData(x, y if labelled else None, torch.arange(n), mix.num_components, "mix")


def _mlp(process, hidden=32, **kw):
    torch.manual_seed(0)
    return Denoiser(MLPDenoiser(2, hidden, 2, **kw), process, (2,))


# ----------------------------------------------------------------------------- processes


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_vp_schedule_equals_diffusers(schedule):
    p = Process("vp", "epsilon", 1000, schedule)
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule).alphas_cumprod
    a, _ = p.coef((torch.arange(1000).float() + 1) / 1000)
    assert torch.allclose(a.double() ** 2, ref.double(), atol=1e-6)
    a0, s0 = p.coef(torch.tensor(0.0))
    assert float(a0) == 1.0 and float(s0) == 0.0  # the clean end: alpha_bar = 1 (set_alpha_to_one)


def test_grid_is_diffusers_trailing_spacing():
    p = Process("vp", "v_prediction")
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    for n in (1, 2, 4, 8):
        sched.set_timesteps(n)
        ours = [round(float(p.timestep(torch.tensor(t)))) for t in p.grid(n)[:-1]]
        assert ours == sched.timesteps.tolist()


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: f"{p.kind}-{p.prediction}")
def test_prediction_round_trip(process):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    tau = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.95])
    x = process.noise(x0, eps, tau)
    pred = process.from_x0_eps(x0, eps, tau)
    back0, back_eps = process.to_x0_eps(pred, x, tau)
    assert torch.allclose(back0, x0, atol=1e-4) and torch.allclose(back_eps, eps, atol=1e-4)


def test_ddim_step_equals_diffusers_ddim_and_flow_euler():
    g = torch.Generator().manual_seed(1)
    x, out = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    p = Process("vp", "v_prediction")
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                    prediction_type="v_prediction", timestep_spacing="trailing", set_alpha_to_one=True,
                                    clip_sample=False)
    sched.set_timesteps(4)
    t = int(sched.timesteps[1])  # 749 -> 499
    ref = sched.step(out, t, x).prev_sample
    tau = full((t + 1) / 1000, 4)
    x0, eps = p.to_x0_eps(out, x, tau)
    assert torch.allclose(p.ddim_step(x0, eps, 0.5), ref, atol=1e-5)
    f = Process("flow", "flow")
    fs = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    fs.set_timesteps(4)
    ref = fs.step(out, fs.timesteps[1], x).prev_sample
    sig, nxt = float(fs.sigmas[1]), float(fs.sigmas[2])
    x0, eps = f.to_x0_eps(out, x, full(sig, 4))
    assert torch.allclose(f.ddim_step(x0, eps, nxt), ref, atol=1e-5)


def test_bad_process_is_refused():
    with pytest.raises(DistilleryError, match="cannot use prediction"):
        Process("flow", "v_prediction")
    with pytest.raises(DistilleryError, match="beta schedule"):
        Process("vp", "epsilon", beta_schedule="cubic")


# ----------------------------------------------------------------------------- the exact teacher


def test_posterior_mean_and_score_match_a_naive_density():
    mix = GaussianMixture(torch.tensor([[1.0, 0.0], [-1.0, 0.5], [0.0, -1.5]]), torch.tensor([0.3, 0.5, 0.2]),
                          torch.tensor([0.5, 0.3, 0.2]))
    a, s = torch.full((5,), 0.8), torch.full((5,), 0.6)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    # naive: log p_t(x) = logsumexp_k log pi_k + log N(x; a mu_k, (a^2 sigma_k^2 + s^2) I), by autograd
    var = a[:, None] ** 2 * mix.stds[None] ** 2 + s[:, None] ** 2
    d2 = ((x[:, None] - 0.8 * mix.means[None]) ** 2).sum(-1)
    logp = (mix.weights.log()[None] - 0.5 * d2 / var - torch.log(2 * math.pi * var)).logsumexp(-1)
    (score,) = torch.autograd.grad(logp.sum(), x)
    assert torch.allclose(mix.score(x.detach(), a, s), score, atol=1e-5)
    # Tweedie: E[x0 | x] = (x + s^2 score) / a
    assert torch.allclose(mix.posterior_mean(x.detach(), a, s), (x.detach() + 0.36 * score) / 0.8, atol=1e-5)


def test_log_prob_of_clean_samples_is_the_mixture_density():
    mix = GaussianMixture(torch.tensor([[0.0, 0.0]]), 2.0)
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    expected = torch.tensor([-math.log(2 * math.pi * 4), -math.log(2 * math.pi * 4) - 0.5])
    assert torch.allclose(mix.log_prob(x), expected, atol=1e-6)


@pytest.mark.parametrize("process", [Process("vp", "v_prediction"), Process("flow", "flow")], ids=["vp", "flow"])
def test_exact_ode_of_one_gaussian_is_reached_by_many_ddim_steps(process):
    mean, std = torch.tensor([1.0, -2.0]), 0.5
    teacher = ExactDenoiser(GaussianMixture(mean[None], std), process)
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    exact = gaussian_flow(z, 1.0, 0.0, mean, std, process)
    errs = [float((sample(teacher, n, 64, noise=z) - exact).abs().max()) for n in (16, 64, 256)]
    # DDIM / Euler with the exact prediction converges to the closed-form map at first order: 4x the steps,
    # a quarter of the error
    assert errs[2] < 2e-2 and errs[0] / errs[1] > 3.5 and errs[1] / errs[2] > 3.5


def test_trained_teacher_approaches_the_exact_denoiser():
    """The denoising objective's minimiser is the exact posterior mean: training brings the network's x0
    prediction towards the mixture's closed form (the error falls by more than half)."""
    mix, data = _mix_data(4096)
    p = Process("vp", "v_prediction")
    model = _mlp(p, hidden=64)
    exact = ExactDenoiser(mix, p)
    tau = torch.rand(512, generator=torch.Generator().manual_seed(1)) * 0.9 + 0.05
    x0, _ = mix.sample(512, torch.Generator().manual_seed(2))
    xt = p.noise(x0, torch.randn(512, 2, generator=torch.Generator().manual_seed(3)), tau)

    def err():
        with torch.no_grad():
            return float((model.x0_eps(xt, tau)[0] - exact.x0(xt, tau)).pow(2).mean())

    before = err()
    D.train_teacher(model, data, TrainConfig(epochs=8, batch_size=128, lr=3e-3), progress=False)
    assert err() < 0.5 * before


# ----------------------------------------------------------------------------- method targets


def test_pd_target_lands_where_two_exact_ddim_steps_land():
    mix, data = _mix_data(8)
    p = Process("vp", "v_prediction")
    teacher = ExactDenoiser(mix, p)
    task = ProgressiveTask(teacher, p, teacher_steps=8, seed=0)
    batch = task.prepare(data.batch(torch.arange(8)), epoch=0)
    z, tau = batch["x"], batch["tau"]
    x0, eps = p.to_x0_eps(batch["target"], z, tau)
    one_step = p.ddim_step(x0, eps, tau - 2 / 8)  # the student's single DDIM step with its target
    t0, e0 = p.to_x0_eps(teacher(z, tau), z, tau)
    z1 = p.ddim_step(t0, e0, tau - 1 / 8)
    t1, e1 = p.to_x0_eps(teacher(z1, tau - 1 / 8), z1, tau - 1 / 8)
    z2 = p.ddim_step(t1, e1, tau - 2 / 8)
    assert torch.allclose(one_step, z2, atol=1e-4)
    assert set((tau * 8).round().long().tolist()) <= {2, 4, 6, 8}  # the student's grid of 4 steps


def test_cd_target_is_the_ema_consistency_function_after_one_exact_ode_step():
    mix, data = _mix_data(16)
    p = Process("vp", "v_prediction")
    teacher = ExactDenoiser(mix, p)
    student = _mlp(p)
    fn = ConsistencyFn(student)
    task = ConsistencyTask(teacher, fn, solver_steps=50, seed=0)
    batch = task.prepare(data.batch(torch.arange(16)), epoch=0)
    z, hi = batch["x"], batch["tau"]
    lo = hi - 1 / 50
    t0, e0 = p.to_x0_eps(teacher(z, hi), z, hi)
    z_lo = p.ddim_step(t0, e0, lo)  # the exact one-step DDIM solve of the teacher's ODE
    with torch.no_grad():
        expected = fn(z_lo, lo)  # EMA copy == online weights before any step
    assert torch.allclose(batch["target"], expected, atol=1e-5)
    # LCM's boundary condition: f(x, tau=0) = x
    c_skip, c_out = lcm_scalings(p, torch.tensor([0.0]))
    assert float(c_skip) == 1.0 and float(c_out) == 0.0


def test_segmented_consistency_maps_to_the_segment_edge_and_is_identity_on_it():
    p = Process("vp", "v_prediction")
    mix, data = _mix_data(64)
    teacher = ExactDenoiser(mix, p)
    fn = ConsistencyFn(_mlp(p), segments=4)
    assert fn.edge(torch.tensor([1.0, 0.76, 0.75, 0.3, 0.25, 0.01])).tolist() == [0.75, 0.75, 0.5, 0.25, 0.0, 0.0]
    task = ConsistencyTask(teacher, fn, solver_steps=8, seed=3)
    batch = task.prepare(data.batch(torch.arange(64)), epoch=0)
    lo = batch["tau"] - 1 / 8
    on_edge = ((lo * 4).round() - lo * 4).abs() < 1e-6
    assert bool(on_edge.any())
    z = batch["x"][on_edge]
    t0, e0 = p.to_x0_eps(teacher(z, batch["tau"][on_edge]), z, batch["tau"][on_edge])
    assert torch.allclose(batch["target"][on_edge], p.ddim_step(t0, e0, lo[on_edge]), atol=1e-5)
    with pytest.raises(DistilleryError, match="divisible"):
        ConsistencyTask(teacher, fn, solver_steps=6, seed=0)


def test_dmd_gradient_on_a_1d_gaussian_is_closed_form():
    """Real data N(0, 1), fake (generator) distribution N(m, 1), vp path with a^2 + s^2 = 1: the posterior
    means differ by m s^2 everywhere, so the unnormalised gradient is m s^2 (it points from the real mean
    towards the fake one: the generator moves against it, towards the data), and DMD divides it by
    mean |x - x0_real|."""
    p = Process("vp", "v_prediction")
    m = 1.5
    real = ExactDenoiser(GaussianMixture(torch.tensor([[0.0]]), 1.0), p)
    fake = ExactDenoiser(GaussianMixture(torch.tensor([[m]]), 1.0), p)
    x = torch.tensor([[0.7], [1.9], [-0.4]])
    tau = torch.full((3,), 0.5)
    _a, s = p.coef(tau)
    xt = p.noise(x, torch.tensor([[0.3], [-1.0], [0.2]]), tau)
    r0, f0 = real.x0(xt, tau), fake.x0(xt, tau)
    assert torch.allclose(f0 - r0, m * s[:, None] ** 2, atol=1e-5)
    grad = dmd_gradient(x, r0, f0)
    assert torch.allclose(grad, m * s[:, None] ** 2 / (x - r0).abs(), atol=1e-5)
    assert bool((grad > 0).all())  # x - grad: every sample moves towards the real mean 0


def test_score_task_two_time_scale_rhythm_and_targets():
    mix, _data = _mix_data(32)
    p = Process("vp", "v_prediction")
    teacher = ExactDenoiser(mix, p)
    pair = ScorePair(_mlp(p), _mlp(p))
    task = ScoreTask(teacher, pair, "dmd", seed=0, shape=(2,), ratio=3)
    steps = []
    pair.train()
    for i in range(6):
        for _ in range(2):  # two micro-batches of one optimiser step share its rhythm
            b = task.prepare({"id": torch.arange(8)}, epoch=i)
            out = pair(b["z"], b["ids"], b["gen_step"], b["tau"], b["fake_x"], b["fake_tau"])
            if not bool(b["gen_step"]):
                assert not out.requires_grad  # no generator gradient on a fake-score-only step
        steps.append(bool(b["gen_step"]))
        task.callback.on_step(None, None)  # the engine calls it after each optimiser step
    assert steps == [True, False, False, True, False, False]
    with pytest.raises(DistilleryError, match="fake-score"):
        ScoreTask(teacher, ScorePair(_mlp(p), None), "vsd", seed=0, shape=(2,))


# ----------------------------------------------------------------------------- training, folders, resume


def test_every_method_improves_one_step_samples_of_an_exact_teacher_quickly(tmp_path):
    """Tiny budgets, exact teacher: each method's student runs end to end and its one-step samples beat
    the exact teacher sampled in two steps on sliced Wasserstein distance."""
    mix, data = _mix_data(2048)
    ref, _ = mix.sample(1000, torch.Generator().manual_seed(9))
    p = Process("vp", "v_prediction")
    teacher = ExactDenoiser(mix, p)
    base = M.swd(sample(teacher, 2, 1000, seed=1), ref)
    tr = TrainConfig(epochs=4, batch_size=128, lr=2e-3)
    pd = D.progressive(teacher, data, _mlp(p, 64), start=4, stop=1, train=tr, progress=False)
    init = D.train_teacher(_mlp(p, 64), data, tr, progress=False)  # CD starts from a denoiser, as LCM from SD
    cd = D.consistency(teacher, D.copy_of(init), data, solver_steps=8, train=TrainConfig(epochs=15, batch_size=128, lr=2e-3),
                       progress=False)
    rf, _ = D.reflow(teacher, _mlp(Process("flow", "flow"), 64), 1024, tmp_path / "pairs", pair_steps=16, train=tr,
                     progress=False)
    for name, model in (("pd", pd[1]), ("cd", cd), ("reflow", rf)):
        assert M.swd(sample(model, 1, 1000, seed=1), ref) < base, name
    assert (tmp_path / "pairs" / "manifest.json").is_file()  # the pairs live in the teacher-output store


def test_consistency_resume_after_a_crash_is_exact(tmp_path, monkeypatch):
    """A run cut mid-epoch resumes from its step checkpoint to the same weights and EMA target as an
    uncut run (the EMA target is checkpointed with the student; times and noise are seeded by id)."""
    mix, data = _mix_data(512)
    p = Process("vp", "v_prediction")
    teacher = ExactDenoiser(mix, p)
    tr = TrainConfig(epochs=2, batch_size=64, checkpoint_every_steps=3)
    whole = D.consistency(teacher, _mlp(p), data, train=tr, run_dir=tmp_path / "a", progress=False)
    real, calls = ConsistencyTask.prepare, {"n": 0}

    def crashing(self, batch, *, epoch):
        calls["n"] += 1
        if calls["n"] == 12:  # the 12th step: past the step-9 checkpoint
            raise RuntimeError("power cut")
        return real(self, batch, epoch=epoch)

    monkeypatch.setattr(ConsistencyTask, "prepare", crashing)
    with pytest.raises(RuntimeError, match="power cut"):
        D.consistency(teacher, _mlp(p), data, train=tr, run_dir=tmp_path / "b", progress=False)
    monkeypatch.setattr(ConsistencyTask, "prepare", real)
    again = D.consistency(teacher, _mlp(p), data, train=tr, run_dir=tmp_path / "b", progress=False)
    for x, y in zip(whole.state_dict().values(), again.state_dict().values()):
        assert torch.equal(x, y)


def test_unet_student_folder_loads_in_diffusers_and_samples_the_same(tmp_path):
    torch.manual_seed(0)
    p = Process("vp", "v_prediction")
    model = Denoiser(unet(1, 8, (8, 16), 1), p, (1, 8, 8)).eval()
    path = save_folder(model, tmp_path / "student")
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = diffusers.DDPMPipeline.from_pretrained(path)  # diffusers alone, no distillery class needed
    assert isinstance(pipe.scheduler, diffusers.DDIMScheduler)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = sample(model, 4, 3, noise=z)
    sched = diffusers.DDIMScheduler.from_pretrained(path / "scheduler")
    sched.set_timesteps(4)
    x = z.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(pipe.unet(x, t).sample, t, x).prev_sample
    assert torch.allclose(ours, x, atol=1e-4)
    back = load_folder(path)
    assert torch.allclose(sample(back, 4, 3, noise=z), ours, atol=1e-6)


def test_mlp_folder_round_trip_keeps_process_and_sampler(tmp_path):
    model = _mlp(Process("flow", "flow"), num_classes=3, guidance=True)
    model.sampler = "consistency"
    back = load_folder(save_folder(model, tmp_path / "m"))
    assert back.process == model.process and back.sampler == "consistency" and back.takes_w
    x, tau = torch.randn(4, 2), torch.full((4,), 0.5)
    labels, w = torch.tensor([0, 1, 2, 3]), torch.full((4,), 2.0)
    with torch.no_grad():
        assert torch.allclose(back(x, tau, labels, w), model.eval()(x, tau, labels, w))


def test_bad_teacher_folders_are_refused(tmp_path):
    model = Denoiser(unet(1, 8, (8, 16), 1), Process("vp", "v_prediction"), (1, 8, 8))
    path = save_folder(model, tmp_path / "t")
    (path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(DistilleryError, match="safetensors"):
        load_folder(path)
    other = save_folder(model, tmp_path / "pndm")
    (other / "distillery.json").unlink()
    cfg = json.loads((other / "scheduler" / "scheduler_config.json").read_text())
    cfg["_class_name"] = "PNDMScheduler"
    (other / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    with pytest.raises(DistilleryError, match="cannot drive"):
        load_folder(other)
    with pytest.raises(DistilleryError, match="not a diffusers folder"):
        load_folder(tmp_path)


def test_methods_refuse_what_they_cannot_use():
    mix, _ = _mix_data(8)
    teacher = ExactDenoiser(mix, Process("vp", "epsilon"))
    with pytest.raises(DistilleryError, match="epsilon-prediction"):
        ProgressiveTask(teacher, Process("vp", "epsilon"), 8, 0)
    with pytest.raises(DistilleryError, match="power of two"):
        ProgressiveTask(teacher, Process("vp", "v_prediction"), 6, 0)
    with pytest.raises(DistilleryError, match="power of two"):
        D.progressive(teacher, None, start=12)
    with pytest.raises(DistilleryError, match="flow"):
        D.reflow(teacher, _mlp(Process("vp", "v_prediction")), 8, "never-written")
    with pytest.raises(DistilleryError, match="differs from the teacher's"):
        ConsistencyTask(teacher, ConsistencyFn(_mlp(Process("vp", "v_prediction", beta_schedule="linear"))), 50, 0)
    with pytest.raises(DistilleryError, match="differs from the teacher's"):
        ProgressiveTask(teacher, Process("flow", "flow"), 8, 0)
    with pytest.raises(DistilleryError, match="guidance"):
        ConsistencyTask(teacher, ConsistencyFn(_mlp(Process("vp", "v_prediction"))), 50, 0, num_classes=8,
                        guidance=(1.0, 2.0))


def test_guidance_distillation_student_takes_w():
    """Plumbing: the scale w reaches the student through training and sampling (not ignored on the way)."""
    mix, data = _mix_data(256, labelled=True)
    p = Process("vp", "v_prediction")
    teacher = ExactDenoiser(mix, p)
    student = _mlp(p, num_classes=8, guidance=True)
    D.consistency(teacher, student, data, guidance=(1.0, 3.0), train=TrainConfig(epochs=1, batch_size=64),
                  progress=False)
    labels = torch.arange(40) % 8
    a = sample(student, 2, 40, class_labels=labels, w=1.0, seed=0)
    b = sample(student, 2, 40, class_labels=labels, w=3.0, seed=0)
    assert not torch.allclose(a, b)  # w reaches the student


# ----------------------------------------------------------------------------- metrics


def test_metrics_against_hand_values():
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[2.0], [3.0]])
    # 1-D: every projection is +-1, W1 between {0, 1} and {2, 3} is 2
    assert M.swd(x, y, projections=8) == pytest.approx(2.0)
    # E|X-Y| = 2, E|X-X'| = E|Y-Y'| = 0.5 (V-statistics): 2*2 - 0.5 - 0.5 = 3
    assert M.energy(x, y) == pytest.approx(3.0)
    f = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
    assert M.frechet(f, f) == pytest.approx(0.0, abs=1e-6)
    assert M.frechet(f, f + 1.0) == pytest.approx(4.0, rel=1e-6)  # a shift of 1 in 4 dims
    mix = named("mixture2d")
    pts = mix.means.repeat(10, 1)
    assert M.coverage(mix, pts) == 1.0 and M.coverage(mix, mix.means[:4].repeat(10, 1)) == 0.5


def test_a_diffusers_folder_is_a_teacher_and_bad_recipes_are_one_line_errors(tmp_path, capsys):
    from distillery.cli import main

    torch.manual_seed(0)
    folder = save_folder(Denoiser(MLPDenoiser(2, 32, 2), Process("vp", "v_prediction"), (2,)), tmp_path / "teacher")
    out = tmp_path / "run"
    assert main(["run", "diffusion/cd", f"teacher.source={folder}", "samples=256", "student.train.epochs=1",
                 "eval.samples=100", "eval.teacher_steps=[1]", "threads=1", f"runs_dir={tmp_path / 'runs'}", "--out",
                 str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"][0]["teacher"] == "folder" and (out / "models" / "cd" / "unet").is_dir()
    capsys.readouterr()
    assert main(["run", "diffusion/cd", f"teacher.source={folder}", "teacher.class_conditional=true",
                 f"runs_dir={tmp_path / 'runs'}", "--quiet"]) != 0
    assert "conditioned on 0 classes" in capsys.readouterr().err
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    for override, message in ((f"teacher.source={folder}", "safetensors"), ("settings.pd_start=6", "power of two"),
                              ("data=digits", "exact"), ("method=lcm", "not known")):
        extra = ["teacher.source=exact"] if override == "data=digits" else []
        capsys.readouterr()
        assert main(["run", "diffusion/cd", override, *extra, f"runs_dir={tmp_path / 'runs'}", "--quiet"]) != 0
        err = capsys.readouterr().err.strip()
        assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err


def test_multistep_generator_input_is_its_own_backward_simulation():
    """DMD2's backward simulation: at step i of a 4-step schedule the generator's input is its own x0 from
    the previous step renoised to tau_i; at step 0 it is the noise itself."""
    mix, _ = _mix_data(8)
    p = Process("vp", "v_prediction")
    pair = ScorePair(_mlp(p), _mlp(p))
    task = ScoreTask(ExactDenoiser(mix, p), pair, "dmd", seed=0, shape=(2,), steps=4)
    b = task.prepare({"id": torch.arange(64)}, epoch=0)
    assert set(b["tau"].tolist()) <= {1.0, 0.75, 0.5, 0.25} and len(set(b["tau"].tolist())) > 1
    from distillery.diffusion.methods import seeded

    g = seeded(0, 0, torch.arange(64), "dmd")  # the task's own draws, in its order: z, the steps, the renoising
    z = torch.randn(64, 2, generator=g)
    i = torch.randint(0, 4, (64,), generator=g)
    eps = torch.randn(64, 2, generator=g)
    with torch.no_grad():
        x1 = p.noise(pair.generate(z, torch.arange(64), full(1.0, 64)), eps, full(0.75, 64))
    assert torch.equal(b["tau"], 1 - i.float() / 4)
    assert torch.equal(b["z"][i == 0], z[i == 0])  # step 0: the noise itself
    assert torch.allclose(b["z"][i == 1], x1[i == 1], atol=1e-6)  # step 1: its own x0 at tau 1, renoised
    with pytest.raises(DistilleryError, match="point set"):
        from distillery.diffusion.methods import PointSet

        ScoreTask(ExactDenoiser(mix, p), ScorePair(PointSet(torch.zeros(4, 2)), None), "sds", seed=0, shape=(2,),
                  steps=2)


def test_guidance_distilled_at_a_fixed_w_is_not_applied_twice(tmp_path):
    """A student distilled from a guided teacher at a fixed w outputs guided predictions: sampling it with w
    runs it once (no classifier-free guidance on top), and the scale survives its folder."""
    from distillery.diffusion.nets import guided

    mix, data = _mix_data(256, labelled=True)
    p = Process("vp", "v_prediction")
    teacher = ExactDenoiser(mix, p)
    students = D.progressive(teacher, data, _mlp(p, num_classes=8), start=4, w=2.0,
                             train=TrainConfig(epochs=1, batch_size=64), progress=False)
    assert all(s.guided == 2.0 for s in students.values())
    s = students[1]
    x, tau, labels = torch.randn(8, 2), torch.full((8,), 0.5), torch.arange(8)
    with torch.no_grad():
        once = p.to_x0_eps(s(x, tau, labels), x, tau)
        assert torch.allclose(guided(s, x, tau, labels, torch.full((8,), 2.0), p)[0], once[0])
    assert load_folder(save_folder(s, tmp_path / "s")).guided == 2.0
    cd = D.consistency(teacher, _mlp(p, num_classes=8), data, w=2.0, train=TrainConfig(epochs=1, batch_size=64),
                       progress=False)
    assert cd.guided == 2.0


def test_resuming_with_other_method_settings_is_refused(tmp_path):
    """The engine's run signature holds the task's settings and its teacher: continuing a consistency run
    with another solver grid is refused, not silently mixed."""
    mix, data = _mix_data(256)
    p = Process("vp", "v_prediction")
    teacher = ExactDenoiser(mix, p)
    D.consistency(teacher, _mlp(p), data, train=TrainConfig(epochs=1, batch_size=64), run_dir=tmp_path, progress=False)
    D.consistency(teacher, _mlp(p), data, train=TrainConfig(epochs=1, batch_size=64), run_dir=tmp_path, progress=False)
    with pytest.raises(DistilleryError, match="other settings"):
        D.consistency(teacher, _mlp(p), data, solver_steps=20, train=TrainConfig(epochs=1, batch_size=64),
                      run_dir=tmp_path, progress=False)
