"""Independent, straightforward formulations of the paper's methods.

Written the way the reference code does it (zero-padded SVD factors,
per-expert Python loops, autograd through the loss) and sharing nothing with
``mergekit_mllm.ops``, so that the tests compare two implementations.
"""

from __future__ import annotations

import torch


def task_vectors(base, experts, weights=None):
    weights = weights or [1.0] * len(experts)
    return [w * (e - base) for e, w in zip(experts, weights)]


def weight_average(base, experts, lam=1.0, weights=None):
    tvs = task_vectors(base, experts, weights)
    return base + lam * sum(tvs) / len(tvs)


def task_arithmetic(base, experts, lam=1.0, weights=None):
    return base + lam * sum(task_vectors(base, experts, weights))


def _mask_smallest(param, mask_rate):
    num_mask = int(param.numel() * mask_rate)
    if num_mask == 0:
        return param
    kth = param.reshape(-1).abs().kthvalue(k=num_mask).values
    return param * (param.abs() >= kth)


def ties(base, experts, density=0.2, lam=1.0, weights=None, tvs=None):
    tvs = tvs if tvs is not None else task_vectors(base, experts, weights)
    masked = [_mask_smallest(tv, 1.0 - density) for tv in tvs]
    signs = torch.sign(sum(masked))
    if (signs == 0).any():
        signs[signs == 0] = torch.sign(signs.sum())
    preserved = [p * (((signs > 0) & (p > 0)) | ((signs < 0) & (p < 0))) for p in masked]
    count = sum((p != 0).to(base.dtype) for p in preserved)
    return base + lam * sum(preserved) / torch.clamp(count, min=1.0)


def tsv(base, experts, rank_fraction=None, lam=1.0):
    tvs = task_vectors(base, experts)
    reduction = rank_fraction if rank_fraction is not None else 1.0 / len(tvs)
    sum_u = sum_s = sum_v = None
    for i, vec in enumerate(tvs):
        u, s, v = torch.linalg.svd(vec, full_matrices=False)
        k = int(s.shape[0] * reduction)
        if i == 0:
            sum_u, sum_s, sum_v = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
        sum_u[:, i * k : (i + 1) * k] = u[:, :k]
        sum_s[i * k : (i + 1) * k] = s[:k]
        sum_v[i * k : (i + 1) * k, :] = v[:k, :]
    u_u, _, v_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_v, _, v_v = torch.linalg.svd(sum_v, full_matrices=False)
    return base + lam * torch.linalg.multi_dot([u_u, v_u, torch.diag(sum_s), u_v, v_v])


def iso_c(base, experts, lam=1.0):
    u, s, v = torch.linalg.svd(sum(task_vectors(base, experts)), full_matrices=False)
    return base + lam * torch.linalg.multi_dot([u, torch.diag(torch.full_like(s, s.mean())), v])


def iso_cts(base, experts, common_space_fraction=0.8, lam=1.0):
    tvs = task_vectors(base, experts)
    n_tasks = len(tvs)
    r = min(base.shape)
    common = int(r * common_space_fraction)
    common = r - round((r - common) / n_tasks) * n_tasks
    u, s, v = torch.linalg.svd(sum(tvs), full_matrices=False)
    cu, cs, cv = u[:, :common], s[:common], v[:common, :]
    per_task = int((r - common) / n_tasks)
    comb_u = comb_s = comb_v = None
    for i, w in enumerate(tvs):
        w_ts = w - cu @ cu.T @ w
        u_ts, s_ts, v_ts = torch.linalg.svd(w_ts, full_matrices=False)
        if i == 0:
            comb_u, comb_s, comb_v = torch.zeros_like(u_ts), torch.zeros_like(s_ts), torch.zeros_like(v_ts)
        comb_u[:, i * per_task : (i + 1) * per_task] = u_ts[:, :per_task]
        comb_s[i * per_task : (i + 1) * per_task] = s_ts[:per_task]
        comb_v[i * per_task : (i + 1) * per_task, :] = v_ts[:per_task, :]
    start = n_tasks * per_task
    comb_u[:, start : start + common] = cu
    comb_s[start : start + common] = cs
    comb_v[start : start + common, :] = cv
    uu, _, vu = torch.linalg.svd(comb_u, full_matrices=False)
    uv, _, vv = torch.linalg.svd(comb_v, full_matrices=False)
    comb_s = torch.ones_like(comb_s) * comb_s.mean()
    return base + lam * torch.linalg.multi_dot([uu @ vu, torch.diag(comb_s), uv @ vv])


def wudi(base, experts, iterations=300, lr=1e-5, lam=1.0):
    vectors = torch.stack(task_vectors(base, experts))
    merging = torch.nn.Parameter(vectors.sum(dim=0))
    optimizer = torch.optim.Adam([merging], lr=lr)
    norms = torch.square(torch.norm(vectors.reshape(vectors.shape[0], -1), p=2, dim=-1))
    for _ in range(iterations):
        disturbing = merging.unsqueeze(0) - vectors
        inner = torch.matmul(disturbing, vectors.transpose(1, 2))
        loss = torch.sum(torch.square(inner) / norms.unsqueeze(-1).unsqueeze(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return base + lam * merging.detach()


def optmerge(base, experts, variant="lora", rank_fraction=None, iterations=300, lr=None, momentum=0.9, lam=1.0):
    vectors = torch.stack(task_vectors(base, experts))
    n = vectors.shape[0]
    reduction = rank_fraction if rank_fraction is not None else 1.0 / n
    average = vectors.mean(dim=0)
    low_rank, targets = [], []
    for vector in vectors:
        _, s, v = torch.linalg.svd(vector, full_matrices=True)
        source = vector if variant == "lora" else vector - average
        u2, s2, v2 = torch.linalg.svd(source, full_matrices=False)
        k = int(s.shape[0] * reduction)
        s = s * (torch.arange(s.shape[0]) < k).to(s.dtype)
        v = v * (torch.arange(v.shape[0]) < k).to(v.dtype)[:, None]
        s_matrix = torch.zeros(vector.shape, dtype=vector.dtype)
        m = min(vector.shape)
        s_matrix[:m, :m] = torch.diag_embed(s)
        low_rank.append(s_matrix @ v)
        target = u2[:, :k] @ torch.diag_embed(s2[:k]) @ v2[:k, :]
        targets.append(target if variant == "lora" else target + average)
    low_rank, targets = torch.stack(low_rank), torch.stack(targets)
    norms = torch.square(torch.norm(vectors.reshape(n, -1), p=2, dim=-1))
    if variant == "lora":
        merging = torch.nn.Parameter(average.clone())
        optimizer = torch.optim.SGD([merging], lr=lr or 1e-4, momentum=momentum)
    else:
        merging = torch.nn.Parameter(vectors.sum(dim=0))
        optimizer = torch.optim.Adam([merging], lr=lr or 1e-5)
    for _ in range(iterations):
        inner = torch.matmul(merging.unsqueeze(0) - targets, low_rank.transpose(1, 2))
        loss = torch.sum(torch.square(inner) / norms.unsqueeze(-1).unsqueeze(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return base + lam * merging.detach()
