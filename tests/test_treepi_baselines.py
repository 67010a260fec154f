"""TreePI's baselines and scales: MPO+Predictive (--e-step mpo) against mpo.py's E-step, the searched roots drawn
at random from the valid states, L_Q's target with --target-samples, the policy's variance [TreePI App. B], and
--reward-scale against the temperature."""

import inspect
import math
import os

import numpy as np
import pytest
import torch

import mpo
import treepi
from treepi import make_env


@pytest.fixture
def one_thread():
    """Small networks in a loop: one torch thread (as train's setup), not the machine's contended cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_args(**overrides) -> treepi.Args:
    base = dict(
        model_sizes=(8, 8), policy_hidden_sizes=(8,), critic_hidden_sizes=(8,), num_samples=4, batch_size=6, snippet_length=3
    )
    return treepi.Args(**{**base, **overrides})


def tiny_nets(args: treepi.Args, obs_dim: int = 4) -> dict:
    """pi, pi^(i), Q, Q' and the latent model for InvertedPendulum-v5's spaces, targets equal to the online nets."""
    space = make_env("InvertedPendulum-v5").action_space
    in_dim = args.model_sizes[-1] if args.model == "learned" else obs_dim
    policy = (in_dim, space, args.policy_hidden_sizes, args.activation, args.layer_norm, args.full_covariance)
    critic = (in_dim, 1, args.critic_hidden_sizes, args.activation, args.layer_norm)
    nets = dict(actor=treepi.GaussianActor(*policy), actor_target=treepi.GaussianActor(*policy))
    nets.update(critic=treepi.Critic(*critic), critic_target=treepi.Critic(*critic))
    for name in ("actor", "critic"):
        nets[f"{name}_target"].load_state_dict(nets[name].state_dict())
        nets[f"{name}_target"].requires_grad_(False)
    nets["model"] = treepi.LatentModel(obs_dim, 1, args.model_sizes, args.critic_hidden_sizes, args.activation, True)
    return nets


def filled_replay(steps: int = 20) -> treepi.SnippetReplay:
    """Random transitions of one env, an episode end every 7th step."""
    widths = dict(obs=(4,), actions=(1,), next_obs=(4,), physics=(0,))
    replay = treepi.SnippetReplay(steps, 1, widths, 3, torch.device("cpu"))
    for t in range(steps):  # obs, actions, rewards, next_obs, terminated, ended, physics
        ended = torch.tensor([float(t % 7 == 6)])
        replay.add(
            torch.randn(1, 4), torch.randn(1, 1), torch.randn(1), torch.randn(1, 4), torch.zeros(1), ended, torch.zeros(1, 0)
        )
    return replay


# -- MPO+Predictive: mpo.py's E-step ------------------------------------------------------
def test_mpo_e_step_is_mpo_pys_code_and_numbers():
    """The E-step functions are copied from mpo.py (same source), and on the same Q values, prior and eta they give
    the same weights and dual loss, bit for bit; the weights are also softmax(Q / eta) by hand, the dual eq. 9."""
    for name in ("temperature_dual", "e_step_weights", "dual_variable", "log_dual"):
        assert inspect.getsource(getattr(treepi, name)) == inspect.getsource(getattr(mpo, name)), name
    generator = torch.Generator().manual_seed(3)
    q = 5 * torch.randn(7, 20, generator=generator, dtype=torch.float64)
    log_prior = torch.full_like(q, -math.log(20))
    for eta_value in (0.05, 1.0, 30.0):
        eta = torch.tensor(eta_value, dtype=torch.float64)
        ours, theirs = treepi.e_step_weights(q, eta, log_prior), mpo.e_step_weights(q, eta, log_prior)
        assert torch.equal(ours, theirs)
        assert torch.equal(treepi.temperature_dual(eta, q, log_prior, 0.1), mpo.temperature_dual(eta, q, log_prior, 0.1))
        by_hand = np.exp((q.numpy() - q.numpy().max(1, keepdims=True)) / eta_value)
        np.testing.assert_allclose(ours.numpy(), by_hand / by_hand.sum(1, keepdims=True), rtol=1e-12)
        peak = q.numpy().max(1) / eta_value  # log mean_j exp(Q_j / eta), shifted by its largest term
        log_means = peak + np.log(np.mean(np.exp(q.numpy() / eta_value - peak[:, None]), 1))
        dual = 0.1 * eta_value + eta_value * log_means.mean()
        assert treepi.temperature_dual(eta, q, log_prior, 0.1).item() == pytest.approx(dual, rel=1e-12)


@pytest.mark.parametrize("epsilon", [1e-3, 2.0])  # the initial KL lies between (measured: 0.75)
def test_mpo_mode_update_weights_every_valid_state_by_mpos_e_step(epsilon, one_thread):
    """One update with --e-step mpo: the E-step samples M actions of pi^(i) at every valid state of the batch (the
    latents of the unroll), its weights are mpo.py's e_step_weights of Q'(s, a_j) at the current eta, the policy
    loss is -mean_s sum_j w_j log pi(a_j|s) on them, and eta takes Adam's first step (the learning rate) down when
    the E-step's KL(q || pi^(i)) is below epsilon (dg/deta = epsilon - KL), up when above. The plan is never called."""
    torch.manual_seed(5)
    args = tiny_args(e_step="mpo", epsilon=epsilon, epsilon_cov=1e-4, eta_init=0.01)
    nets = tiny_nets(args)
    batch = filled_replay().sample(args.batch_size)
    valid = batch.valid.flatten().bool()
    assert 0 < valid.sum() < valid.numel()  # some snippets stop early
    with torch.no_grad():
        latents = nets["model"].unroll(batch.obs[:, 0], batch.actions)[0][:, :-1].flatten(0, 1)[valid]
        params_before = nets["actor"](latents)
    calls = []
    candidates = nets["actor_target"].candidates
    nets["actor_target"].candidates = lambda params, m: calls.append(candidates(params, m)) or calls[-1]
    duals = [treepi.log_dual(x, torch.device("cpu")) for x in (args.alpha_mean_init, args.alpha_cov_init, args.eta_init)]
    opts = (
        torch.optim.Adam(nets["actor"].parameters(), lr=1e-3),
        torch.optim.Adam([*nets["critic"].parameters(), *nets["model"].parameters()], lr=1e-3),
        torch.optim.Adam(duals, lr=0.01),
    )
    log_eta_before = duals[2].detach().clone()

    def plan(roots):
        raise AssertionError("MPO's E-step searches nothing")

    order = ("actor", "actor_target", "critic", "critic_target", "model")
    numbers = (args.search_states, args.num_samples, args.target_samples, args.gamma, args.epsilon_mean, args.epsilon_cov)
    metrics = treepi.update(*(nets[k] for k in order), plan, opts, *duals[:2], batch, *numbers, duals[2], epsilon)
    actions, log_prior = calls[-1]  # the E-step's draw (the first call is the TD target's)
    assert actions.shape == (int(valid.sum()), args.num_samples, 1)
    q = nets["critic_target"](latents.unsqueeze(1), actions.clamp(-1, 1))
    eta = mpo.dual_variable(log_eta_before)
    weights = mpo.e_step_weights(q, eta, log_prior)
    policy_loss = -(weights * treepi.gaussian_log_prob(actions, *params_before)).sum(-1).mean()
    assert metrics["losses/policy"].item() == pytest.approx(policy_loss.item(), rel=1e-5)
    kl = (weights * (weights.log() - log_prior)).sum(-1).mean().item()
    assert metrics["stats/kl_q"].item() == pytest.approx(kl, rel=1e-5) and metrics["stats/eta"].item() == eta.item()
    step = (duals[2] - log_eta_before).item()
    assert step == pytest.approx(-0.01 if kl < epsilon else 0.01, abs=1e-4)


@pytest.mark.parametrize("target_samples,bootstrap_state", [(1, "observed"), (3, "observed"), (3, "unrolled")])
def test_td_loss_averages_q_prime_over_target_samples_actions_of_the_target_policy(
    target_samples, bootstrap_state, one_thread
):
    """One update's L_Q [TreePI eq. 6] recomputed by hand: Q(s_t, a_t) at the latents of the unroll, the TD target
    r_t + gamma (1 - terminated_t) (1/K) sum_k Q'(s_{t+1}, a_k) with the K = --target-samples actions the update drew
    from pi^(i) at s_{t+1} (a terminated step keeps r_t alone), s_{t+1} the encoder's latent of the stored next
    observation (--bootstrap-state observed) or the unroll's next latent (unrolled), and the squared error over valid
    steps."""
    torch.manual_seed(7)
    args = tiny_args(e_step="mpo", target_samples=target_samples, epsilon_cov=1e-4, bootstrap_state=bootstrap_state)
    nets = tiny_nets(args)
    batch = filled_replay().sample(args.batch_size)
    batch = batch._replace(terminated=(torch.rand_like(batch.rewards) < 0.3).float())
    with torch.no_grad():
        latents = nets["model"].unroll(batch.obs[:, 0], batch.actions)[0]  # [B, T+1, L]
        q = nets["critic"](latents[:, :-1].flatten(0, 1), batch.actions.flatten(0, 1).clamp(-1, 1))
    calls = []
    candidates = nets["actor_target"].candidates
    nets["actor_target"].candidates = lambda params, m: calls.append(candidates(params, m)) or calls[-1]
    duals = [treepi.log_dual(x, torch.device("cpu")) for x in (args.alpha_mean_init, args.alpha_cov_init, args.eta_init)]
    opts = [torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)] * 3
    order = ("actor", "actor_target", "critic", "critic_target", "model")
    numbers = (args.search_states, args.num_samples, args.target_samples, args.gamma, args.epsilon_mean, args.epsilon_cov)
    metrics = treepi.update(
        *(nets[k] for k in order), None, opts, *duals[:2], batch, *numbers, duals[2], args.epsilon, bootstrap_state
    )
    next_actions, _ = calls[0]  # the TD target's draw, at every s_{t+1} of the batch
    assert next_actions.shape == (args.batch_size * args.snippet_length, target_samples, 1)
    loss, count = 0.0, 0
    for i in range(args.batch_size):
        for t in range(args.snippet_length):
            if not batch.valid[i, t]:
                continue
            with torch.no_grad():  # the observed o_{t+1} encoded, or the latent unrolled one step further
                next_latent = (
                    nets["model"].encoder(batch.next_obs[i, t]) if bootstrap_state == "observed" else latents[i, t + 1]
                )
            s_next = next_latent.expand(target_samples, -1)
            with torch.no_grad():
                q_next = nets["critic_target"](s_next, next_actions[i * args.snippet_length + t].clamp(-1, 1)).mean()
            target = batch.rewards[i, t] + args.gamma * (1 - batch.terminated[i, t]) * q_next
            loss, count = loss + (q[i * args.snippet_length + t] - target).item() ** 2, count + 1
    assert metrics["losses/q"].item() == pytest.approx(loss / count, rel=1e-5)


# -- the searched roots -------------------------------------------------------------------
def test_searched_roots_are_drawn_uniformly_from_the_valid_states(one_thread):
    """--model true's roots carry the states' physics, here each state's position in the batch: over 200 updates
    with search_states = 4 every valid state of a fixed batch is searched, an invalid one never, no state twice in one
    update, and each about equally often (Binomial(200, 4 / n_valid): within 5 standard deviations)."""

    class IndexModel:  # the simulator's interface: a root is [obs | physics], the networks read obs
        def roots(self, obs, physics):
            return torch.cat([obs, torch.from_numpy(physics).float()], 1)

    torch.manual_seed(2)
    args = tiny_args(model="true", search_states=4)
    nets = tiny_nets(args)
    batch = filled_replay().sample(args.batch_size)
    batch = batch._replace(physics=torch.arange(batch.valid.numel(), dtype=torch.float64).view(*batch.valid.shape, 1))
    valid = batch.valid.flatten().bool()
    assert 0 < valid.sum() < valid.numel()
    picked = []

    def plan(roots):
        picked.append(roots[:, -1].long())
        return torch.zeros(len(roots), args.num_samples, 1), torch.full((len(roots), args.num_samples), 1 / args.num_samples)

    duals = [treepi.log_dual(1.0, torch.device("cpu")) for _ in range(2)]
    opts = [torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)] * 3  # nothing changes between updates
    order = ("actor", "actor_target", "critic", "critic_target")
    numbers = (args.search_states, args.num_samples, args.target_samples, args.gamma, args.epsilon_mean, args.epsilon_cov)
    for _ in range(200):
        treepi.update(*(nets[k] for k in order), IndexModel(), plan, opts, *duals, batch, *numbers)
    assert all(len(p) == 4 and len(set(p.tolist())) == 4 for p in picked)
    counts = {i: 0 for i in valid.nonzero()[:, 0].tolist()}
    for index in torch.cat(picked).tolist():
        counts[index] += 1  # a KeyError would be an invalid state searched
    n, p = 200, 4 / len(counts)
    assert all(abs(c - n * p) < 5 * math.sqrt(n * p * (1 - p)) for c in counts.values()), counts


# -- the policy's variance ------------------------------------------------------------------
@pytest.mark.parametrize("full_covariance", [False, True])
def test_gaussian_actor_parameterisation(full_covariance):
    """Diagonal [TreePI App. B]: Sigma = diag(softplus(head)), so L L^T's diagonal is log(1 + exp(x)) (+ SCALE_MIN^2)
    by hand; full covariance [MPO App. D]: L's diagonal softplus(x) + SCALE_MIN, its lower part the raw outputs."""
    torch.manual_seed(0)
    space = make_env("Hopper-v5").action_space  # A = 3
    actor = treepi.GaussianActor(5, space, (8,), "elu", True, full_covariance)
    obs = 3 * torch.randn(6, 5)
    mean, scale_tril = actor(obs)
    head = actor.head(actor.trunk(obs)).detach().double().numpy()
    np.testing.assert_allclose(mean.detach().numpy(), head[:, :3], rtol=1e-6)
    raw = head[:, 3:]
    softplus = np.log1p(np.exp(raw))
    covariance = (scale_tril @ scale_tril.transpose(-2, -1)).detach().double().numpy()
    if not full_covariance:
        np.testing.assert_allclose(covariance, np.stack([np.diag(v + 1e-12) for v in softplus]), rtol=1e-5, atol=1e-7)
    else:
        rows, cols = np.tril_indices(3)
        expected = np.zeros((6, 3, 3))
        expected[:, rows, cols] = raw
        diagonal = np.arange(3)
        expected[:, diagonal, diagonal] = softplus[:, rows == cols] + 1e-6
        np.testing.assert_allclose(scale_tril.detach().numpy(), expected, rtol=1e-5, atol=1e-6)


# -- the reward scale against the temperature -----------------------------------------------
def toy_propose(states):
    j = torch.arange(1, 6, dtype=states.dtype)
    actions = torch.sin(states[:, :1] * j + j)[..., None]  # [n, M = 5, 1]
    return actions, torch.cos(states[:, :1] + 2 * actions[..., 0])  # Q' [n, M]


def toy_step(states, actions):
    next_states = 0.9 * states + actions
    return next_states, 3 * torch.sin(states[:, 0] - actions[:, 0]), (next_states[:, 0] < 1.5).to(states.dtype)


def test_scaling_rewards_and_q_by_c_and_alpha_by_c_gives_the_same_search():
    """Q-hat is linear in (r, Q') and the search reads Q-hat / alpha: with the model's rewards through
    scaled(step, c) (the simulator's, under --reward-scale c), Q' learnt on scaled rewards (c Q') and alpha c, the
    same random numbers give the same tree, the same root weights and c times the root's Q-hat."""
    roots = torch.tensor([[0.3], [-0.7], [1.1]], dtype=torch.float64)
    uniforms = 1.0 - np.random.default_rng(0).random((29, 2, 3, 5))
    trees = []
    for c in (1.0, 7.0):

        def propose(states, c=c):
            actions, q = toy_propose(states)
            return actions, c * q

        trees.append(treepi.search(roots, propose, treepi.scaled(toy_step, c), 30, 3, 0.1 * c, 0.99, uniforms))
    plain, scaled = trees
    assert np.array_equal(plain.children, scaled.children) and plain.size.min() > 5
    np.testing.assert_allclose(scaled.q_hat, 7.0 * plain.q_hat, rtol=1e-12)
    torch.testing.assert_close(treepi.root_weights(scaled, 0.7), treepi.root_weights(plain, 0.1), rtol=1e-6, atol=1e-7)


def test_reward_scale_multiplies_the_stored_rewards_only(log_dir):
    """Before learning starts the actions do not depend on it: --reward-scale 4 stores 4 x the rewards of the same
    run at 1 (a power of two: exact in float32), and the logged episode returns stay the env's."""
    flags = ["--env", "InvertedPendulum-v5", "--total-steps", "60", "--learning-starts", "100", "--checkpoint-every", "60"]
    flags += ["--eval-every", "0", "--eval-episodes", "1", "--log-dir", log_dir, "--model-sizes", "8", "8"]
    replays, returns = [], []
    for scale in ("1", "4"):
        out = treepi.train(treepi.parse_args([*flags, "--reward-scale", scale]))
        replays.append(torch.load(os.path.join(out["run_dir"], "resume.pt"), weights_only=True)["train"]["replay"]["data"])
        returns.append(out["eval_return"])
    assert torch.equal(replays[1]["rewards"], 4 * replays[0]["rewards"]) and replays[0]["rewards"].abs().sum() > 0
    assert torch.equal(replays[1]["obs"], replays[0]["obs"]) and returns[0] == returns[1]


# -- end to end ---------------------------------------------------------------------------------
TINY = ["--total-steps", "120", "--learning-starts", "60", "--batch-size", "8", "--snippet-length", "3", "--num-samples", "4"]
TINY += ["--model-sizes", "16", "16", "--policy-hidden-sizes", "16", "--critic-hidden-sizes", "16", "--log-every", "60"]
TINY += ["--eval-every", "0", "--eval-episodes", "1", "--checkpoint-every", "0", "--e-step", "mpo", "--epsilon-cov", "1e-4"]


@pytest.mark.parametrize(
    "env_id,model",
    [("InvertedPendulum-v5", "learned"), ("InvertedPendulum-v5", "true"), ("dm_control/cartpole-swingup-v0", "learned")],
)
def test_mpo_predictive_end_to_end(env_id, model, log_dir, capsys):
    """MPO+Predictive trains, saves eta's parameter with the networks, and --eval-only reloads it."""
    assert treepi.main([*TINY, "--env", env_id, "--model", model, "--log-dir", log_dir]) == 0
    (run_dir,) = [os.path.join(log_dir, d) for d in os.listdir(log_dir)]
    state = torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)["state"]
    assert "log_eta" in state and state["log_eta"].item() != treepi.log_dual(1.0, torch.device("cpu")).item()
    capsys.readouterr()
    assert treepi.main(["--checkpoint", os.path.join(run_dir, "model.pt"), "--eval-only"]) == 0
    assert "eval over 1 episodes" in capsys.readouterr().out


def test_search_mode_checkpoints_carry_no_eta(log_dir):
    """The search's E-step has no eta: its model.pt holds what earlier runs' did, so that they still load."""
    out = treepi.train(treepi.parse_args([*TINY[:-4], "--env", "InvertedPendulum-v5", "--log-dir", log_dir]))
    assert "log_eta" not in torch.load(os.path.join(out["run_dir"], "model.pt"), weights_only=True)["state"]
