"""PatchCore, continual: one coreset memory bank per task under one total budget (seed 003, 1.2).

Embedding (PatchCore's locally aware patch features): frozen backbone layers (WRN50-2: layer2,
layer3), each averaged over its 3x3 neighbourhood (``avg_pool2d(3, stride 1, padding 1)``, zero
padding counted, as anomalib's ``AvgPool2d(3, 1, 1)``), deeper layers upsampled (bilinear) to the
first layer's grid and concatenated: 512 + 1024 = 1536 dims on a 28x28 grid at 224 px.
``aggregation="clad"``: the paper's code instead pools without padding and resamples every layer
with ``AdaptiveAvgPool2d`` to the first layer's grid (clad ``src/trainer/trainer_patchcore.py``).

Memory (seed 003, Algorithm 2). One budget of patches (30000). When task i+1 arrives with i tasks
learned, every stored bank is re-subsampled to ``budget // (i+1)`` and the new task's patches are
subsampled to the same size (greedy k-center coreset on a JL sparse random projection, eps 0.9,
see ``clbench.features.coreset``); a bank already smaller than its target is kept whole, so the
total never exceeds the budget. A joint step (several tasks at once) makes one bank with the whole budget.

Streaming a step's patches (``stream_bytes``). A joint step over 15 MVTec categories at 224 px has
~3600 images x 784 patches x 1536 dims x 4 B = 17.5 GB of patches, too many to hold before the
coreset. ``StreamedCoreset`` keeps them only while they fit under ``stream_bytes`` (default 2 GiB,
above one MVTec category at 224 px with WRN50-2): a step that fits, and any step of one category
whatever its size, is subsampled as one tensor exactly as before (same rows, same order). Otherwise
it becomes a *composable coreset* (Indyk, Mahabadi, Mahdian, Mirrokni, PODS 2014, "Composable
core-sets for diversity and coverage maximization"): the step is cut into parts, one per category
(an image's category is its key's first component; replayed images of earlier categories are parts
of their own), a part that alone exceeds the cap into chunks of about the cap; each part is
subsampled to the bank's target as it is flushed (only its selected rows are kept), and the new
bank is the greedy coreset of the union of the parts' selections. Bound (exact distances): greedy
k-center on a part P_i covers it within 2 r*(P_i) <= 2 r*(P) (Gonzalez's proof allows centres
anywhere, and a subset's optimum is at most the whole's), and greedy on the union U covers U within
2 r*(U) <= 2 r*(P), so every patch is within 4 r* <= 4 x (greedy on all patches' radius) of the
bank (tests/test_patchcore_stream.py). Flushing: when the held patches exceed the cap, every held
category except the latest batch's last image's (the part still arriving: a joint step streams its
categories one after the other) is flushed, and that one too if it alone still exceeds the cap; so
at most the cap plus one batch is held, plus one part's concatenated copy while it is subsampled,
plus the selections (at most the bank target per part; today's all-at-once path held every patch
twice, the per-batch list and its concatenation). A step that teaches one category holds its
patches whole until a second (replayed) category appears, so a one-category step stays
bit-identical whatever its size. Part p's coreset is seeded with
``seeding.bank_seed(bank seed, p)``, the union's with the bank seed itself: deterministic.
Measured by benchmarks/bench_patchcore_joint.py (``--mode streamed|all-at-once``).

Banks live in one concatenated ``memory_bank`` (M, D) float32 buffer with ``bank_sizes`` (n,) and
``bank_tasks`` (n,) (how many tasks each bank was learned from) int64 buffers, so ``state_dict``
carries them; the faiss indexes are derived caches rebuilt from the buffers. (The paper's code:
``mem_size_cl`` 10000 in ``configurations/models/patchcore.json``, ``int(mem_size / (i+1))`` per
bank, ``f_coreset`` 0.1 used only outside CL; set ``budget=10000`` to match it.)

Scoring (seed 003, 1.2.4). Each test patch's Euclidean distance to its nearest neighbour in every
bank (faiss ``IndexFlatL2``, exact; all patches of a batch in one search per bank); the bank with
the lowest mean patch distance is the image's task (``extras["task_index"]``: bank j was learned
at step j, so this is the index of the step that taught the image's category, whatever number of
categories a step teaches; after a joint step it is always 0), as the paper's code does per test
image. Under ``evaluation: oracle`` the batch carries the true task index (``Batch.task_index``)
and the image is scored against that task's bank instead; ``extras["task_index"]`` still reports
the bank the routing would have chosen, so task-identification accuracy is measured under both
settings. The pixel map is the selected bank's distance map, upsampled
to the input and Gaussian-smoothed (sigma 4). Upsampling (``upsample_mode``): ``bilinear``
(default: PatchCore's reference code, ``RescaleSegmentor`` in amazon-science/patchcore-inspection
``src/patchcore/common.py``, and clad's) or ``nearest`` (anomalib 2.7.0's
``AnomalyMapGenerator`` calls ``F.interpolate`` without a mode). Image score: PatchCore eq. 7,

    s* = max_p dist(m_test_p, M),   m* = nearest bank patch of that m_test*,
    w  = 1 - exp(||m_test* - m*||) / sum_{m in N_b(m*)} exp(||m_test* - m||),   score = w * s*

Reweighting neighbourhood N_b(m*): the ``num_neighbors`` nearest bank patches of m*, m* itself
included (its own first neighbour). Default 3: seed 003 1.2.4 ("its 3 nearest memorized
neighbors") and the paper's code (``self.n_reweight = 3``, clad ``src/models/patchcore.py``);
anomalib's default is 9 (``PatchcoreModel(num_neighbors=9)``). ``score_weighting``: ``softmax``
(default) is eq. 7 as written and as anomalib computes it; ``clad`` is the paper's code's variant
(from ind_knn_ad): ``w = 1 - exp(s*/sqrt(D)) / sum exp(||m_test* - m||/sqrt(D))`` with the sum over
the k-1 neighbours *other than* m* (``nn_idx[0, 1:]``; w in [1/2, 1) for k = 3). Choices: the support
distances are computed exactly (difference norms) rather than through the BLAS expansion; with
``num_neighbors == 1`` the score is s* (anomalib's shortcut), whatever the weighting.

Checked against anomalib 2.7.0's ``PatchcoreModel`` (tests/test_parity_patchcore.py): same bank,
maps equal with ``upsample_mode="nearest"``, image scores equal for ``num_neighbors`` 3 and 9.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from clbench.features.backbones import feature_info
from clbench.features.coreset import coreset_indices
from clbench.data import Batch
from clbench.engine import seeding
from clbench.features.knn import FlatL2Index
from clbench.features.maps import finite_or_raise, gaussian_blur, upsample
from clbench.params import BACKBONE, LAYERS, NON_NEGATIVE, POSITIVE_INT, Interval, Options, Param
from methods.base import METHODS, AnomalyMethod, MethodContext, Prediction, TaskData


def patch_embedding(features: list[torch.Tensor], pool: int = 3, aggregation: str = "padded") -> torch.Tensor:
    """(B, P, D): locally aggregated layers on the first layer's grid, concatenated, row-major.

    ``padded``: ``avg_pool2d(pool, 1, pool // 2)`` (zero padding counted, anomalib's ``AvgPool2d(3,
    1, 1)``), deeper layers upsampled bilinearly. ``clad``: the paper's code, ``AvgPool2d(pool,
    stride=1)`` without padding (28 -> 26, 14 -> 12 at 224 px), then ``AdaptiveAvgPool2d`` of every
    layer to the first layer's unpooled grid (26 -> 28 and 12 -> 28).
    """
    grid = features[0].shape[-2:]
    parts = []
    for level in features:
        if aggregation == "clad":
            level = F.adaptive_avg_pool2d(F.avg_pool2d(level, pool, stride=1), grid)
        else:
            if pool > 1:
                level = F.avg_pool2d(level, pool, stride=1, padding=pool // 2)
            if level.shape[-2:] != grid:
                level = F.interpolate(level, size=grid, mode="bilinear", align_corners=False)
        parts.append(level)
    return torch.cat(parts, dim=1).flatten(2).transpose(1, 2).contiguous()


def bank_targets(sizes: list[int], new_size: int, budget: int) -> list[int]:
    """Algorithm 2: sizes of the old banks and of the new one once a task is added."""
    per_task = budget // (len(sizes) + 1)
    if per_task < 1:
        raise ValueError(f"PatchCore: budget {budget} is smaller than the number of tasks ({len(sizes) + 1})")
    return [min(size, per_task) for size in sizes + [new_size]]


def reweighted_score(
    test_patch: torch.Tensor, support: torch.Tensor, max_distance: torch.Tensor, weighting: str = "softmax"
) -> torch.Tensor:
    """PatchCore eq. 7 for a batch: the weight w times s*.

    test_patch (B, D): m_test*; support (B, k, D): m* first, then its k-1 nearest other bank
    patches; max_distance (B,): s* = ||m_test* - m*||.
    ``softmax`` (anomalib): ``w = 1 - softmax_k(||m_test* - support_k||)[m*]``, the paper's eq. 7.
    ``clad`` (the paper's code): ``w = 1 - exp(s*/sqrt(D)) / sum_{k >= 1} exp(||m_test* - support_k||
    / sqrt(D))``, the denominator over the k-1 neighbours *without* m*, temperature sqrt(D).
    Both computed through softmax / logsumexp: the same ratios, no overflow.
    """
    distances = torch.linalg.vector_norm(support - test_patch.unsqueeze(1), dim=-1)  # (B, k)
    if weighting == "clad":
        temperature = test_patch.shape[1] ** 0.5
        log_ratio = max_distance / temperature - torch.logsumexp(distances[:, 1:] / temperature, dim=1)
        return (1.0 - log_ratio.exp()) * max_distance
    return (1.0 - torch.softmax(distances, dim=1)[:, 0]) * max_distance


def image_categories(keys: Sequence[str]) -> list[str]:
    """Each image's category: its key's first component (``<category>/<split>/...``)."""
    return [key.split("/", 1)[0] for key in keys]


def part_seed(bank_seed: int, part: int) -> int:
    """The coreset seed of part ``part`` of a streamed bank: its own stream derived from the bank's."""
    return seeding.bank_seed(bank_seed, part)


class StreamedCoreset:
    """A step's patches fed batch by batch; ``result`` is what the new bank is subsampled from.

    Holds the patches as they come while they fit under ``cap_bytes`` (or, unless ``several``,
    while only one category has been seen); ``result`` is then every patch in arrival order, as
    one tensor (the unstreamed behaviour). Past the cap it flushes parts (module docstring):
    ``select(rows, seed)`` subsamples a part to the bank's target, and ``result`` is the union of
    the selections, in flush order.
    """

    def __init__(self, cap_bytes: int, bank_seed: int, select: Callable[[torch.Tensor, int], torch.Tensor],
                 several: bool = True) -> None:
        self.cap_bytes = cap_bytes
        self.several = several  # the step teaches several categories: it may stream from its first
        self.bank_seed = bank_seed
        self.select = select
        self.pending: list[tuple[str, torch.Tensor]] = []  # (category, rows) in arrival order
        self.pending_bytes = 0
        self.selections: list[torch.Tensor] = []
        self.categories: set[str] = set()
        self.streamed = False

    def add(self, categories: Sequence[str], patches: torch.Tensor) -> None:
        """One batch: ``categories`` per image, ``patches`` (B, P, D)."""
        start = 0
        for end in range(1, len(categories) + 1):  # runs of consecutive images of one category
            if end == len(categories) or categories[end] != categories[start]:
                self.pending.append((categories[start], patches[start:end].flatten(0, 1)))
                start = end
        self.pending_bytes += patches.nelement() * patches.element_size()
        self.categories.update(categories)
        if self.pending_bytes > self.cap_bytes and (self.several or len(self.categories) > 1):
            self.flush(keep=categories[-1])  # the part still arriving stays open

    def flush(self, keep: str | None = None) -> None:
        """Subsample every held category (``keep`` only if it alone still exceeds the cap)."""
        self.streamed = True
        order = list(dict.fromkeys(c for c, _ in self.pending))
        if keep in order:
            order.remove(keep)
            order.append(keep)
        for category in order:
            held = sum(r.nelement() * r.element_size() for c, r in self.pending if c == keep)
            if category == keep and held <= self.cap_bytes:
                break
            rows = [r for c, r in self.pending if c == category]
            self.pending = [(c, r) for c, r in self.pending if c != category]
            self.pending_bytes -= sum(r.nelement() * r.element_size() for r in rows)
            self.compress(torch.cat(rows))

    def compress(self, rows: torch.Tensor) -> None:
        self.selections.append(self.select(rows, part_seed(self.bank_seed, len(self.selections))))

    def result(self) -> torch.Tensor:
        """(N, D): every patch (not streamed) or the union of the parts' selections."""
        if not self.streamed:
            if not self.pending:
                return torch.empty(0)
            rows = torch.cat([r for _, r in self.pending])
            self.pending, self.pending_bytes = [], 0
            return rows
        self.flush()
        return torch.cat(self.selections)


def neighbourhood(index: FlatL2Index, bank: torch.Tensor, centre: torch.Tensor, k: int) -> torch.Tensor:
    """(b, k) bank indices N_b(m*): each ``centre`` first, then its k-1 nearest *other* bank rows.

    m* is its own nearest neighbour in exact arithmetic, but faiss's float32 expansion may rank a
    near-duplicate row first; putting m* first explicitly keeps the support what eq. 7 means.
    """
    _, found = index.search(bank[centre], k)  # (b, k), usually found[:, 0] == centre
    others = torch.sort((found == centre.unsqueeze(1)).to(torch.int8), dim=1, stable=True).indices[:, : k - 1]
    return torch.cat([centre.unsqueeze(1), found.gather(1, others)], dim=1)


@METHODS.register("patchcore")
class PatchCore(AnomalyMethod):
    hyperparameters = {
        "backbone": Param("wide_resnet50_2", BACKBONE),
        "layers": Param(["layer2", "layer3"], LAYERS),
        "budget": Param(30000, POSITIVE_INT),  # patches in memory over all tasks (seed 003); >= 1 per task (fit_task)
        # N_b(m*) of the score reweighting (seed 003: "3 nearest memorized neighbors")
        "num_neighbors": Param(3, POSITIVE_INT),
        # JL distortion of the coreset's random projection; None: no projection
        "projection_eps": Param(0.9, [None, Interval(float, 0, 1, closed="neither")]),
        # softmax: eq. 7 as anomalib | clad: the paper's code's variant
        "score_weighting": Param("softmax", Options("softmax", "clad")),
        # padded: AvgPool2d(3, 1, 1) + bilinear (anomalib) | clad: unpadded + adaptive
        "aggregation": Param("padded", Options("padded", "clad")),
        # map upsampling: bilinear (PatchCore's and clad's code) | nearest (anomalib)
        "upsample_mode": Param("bilinear", Options("bilinear", "nearest")),
        "sigma": Param(4.0, NON_NEGATIVE),  # 0: no smoothing
        "batch_size": Param(32, POSITIVE_INT),
        # bytes of patches a step holds before it streams them as a composable coreset (module docstring)
        "stream_bytes": Param(2**31, POSITIVE_INT),
    }

    def __init__(self, context: MethodContext, **params: Any) -> None:
        super().__init__(context, **params)
        p = self.params
        self.backbone = context.backbones.get(p["backbone"], p["layers"])
        dim = sum(self.backbone.channels)
        self.register_buffer("memory_bank", torch.empty(0, dim))
        self.register_buffer("bank_sizes", torch.empty(0, dtype=torch.long))
        self.register_buffer("bank_tasks", torch.empty(0, dtype=torch.long))
        self._indexes: list[FlatL2Index] = []

    def frozen_backbones(self):
        return [self.backbone]

    # -- embedding -----------------------------------------------------------------------------
    def embed(self, batch: Batch) -> torch.Tensor:
        """(B, P, D) patch features of a batch, from the shared backbone's feature cache."""
        return patch_embedding(self.backbone.features(batch), aggregation=self.params["aggregation"])

    def banks(self) -> list[torch.Tensor]:
        """Views (size_j, D) of the per-task banks inside ``memory_bank``."""
        return list(self.memory_bank.split(self.bank_sizes.tolist())) if self.bank_sizes.numel() else []

    # -- learning ------------------------------------------------------------------------------
    @torch.no_grad()
    def task_patches(self, data: TaskData, target: int, seed: int) -> torch.Tensor:
        """(N, D) what the step's bank is subsampled from: every patch of every training image of the
        step (replayed images included) or, past ``stream_bytes``, the union of its parts' coresets
        of ``target`` rows each (module docstring), on the bank's device."""
        device = self.memory_bank.device
        stream = StreamedCoreset(self.params["stream_bytes"], seed,
                                 lambda rows, s: self.subsample(rows.to(device), target, s),
                                 several=len(data.task_names) > 1)
        for batch in data.train.batches(self.params["batch_size"]):
            stream.add(image_categories(batch.keys), self.embed(batch))
        patches = stream.result()
        if not len(patches):
            raise ValueError(f"PatchCore: no training images for tasks {data.task_names}")
        return patches.to(device)

    def subsample(self, features: torch.Tensor, size: int, seed: int) -> torch.Tensor:
        """Greedy k-center coreset of ``size`` rows (all rows when there are not more)."""
        if size >= features.shape[0]:
            return features
        index = coreset_indices(features, size, eps=self.params["projection_eps"], seed=seed)
        return features.index_select(0, index)

    @torch.no_grad()
    def fit_task(self, data: TaskData) -> None:
        old = self.banks()
        sizes, budget = [len(b) for b in old], self.params["budget"]
        seed = seeding.bank_seed(data.seed, len(old))
        patches = self.task_patches(data, bank_targets(sizes, budget, budget)[-1], seed)  # budget // (t + 1)
        targets = bank_targets(sizes, patches.shape[0], budget)
        banks = [self.subsample(bank, size, seeding.bank_seed(data.seed, j)) for j, (bank, size) in enumerate(zip(old, targets))]
        banks.append(self.subsample(patches, targets[-1], seed))
        del patches
        device = self.memory_bank.device
        self.memory_bank = torch.cat(banks).contiguous()
        self.bank_sizes = torch.tensor([len(b) for b in banks], dtype=torch.long, device=device)
        self.bank_tasks = torch.cat([self.bank_tasks, torch.tensor([len(data.task_names)], device=device)])
        self.on_state_loaded()
        # recorded per step (training.csv): 1 when every bank is searched by a faiss GPU index; the
        # reason for a CPU index (no CUDA, a faiss-cpu build, a failed GPU index) is logged by knn
        self.fit_info["knn_gpu"] = float(all(index.gpu for index in self._indexes))

    def on_state_loaded(self) -> None:
        """Rebuild the per-bank faiss indexes (derived from ``memory_bank``)."""
        self._indexes = [FlatL2Index(bank) for bank in self.banks()]

    def memory_components(self) -> dict[str, int]:
        """The base accounting plus the faiss indexes' own copies of the banks as a cache."""
        components = super().memory_components()
        components["method_cache"] += sum(index.nbytes for index in self._indexes)
        return components

    # -- scoring -------------------------------------------------------------------------------
    def search_banks(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest-neighbour distance and index of every query in every bank: (n_banks, Q) each."""
        results = [index.search(queries, 1) for index in self._indexes]
        distances = torch.stack([d[:, 0] for d, _ in results])
        indices = torch.stack([i[:, 0] for _, i in results])
        return distances, indices

    def image_scores(
        self, emb: torch.Tensor, distances: torch.Tensor, nearest: torch.Tensor, task: torch.Tensor
    ) -> torch.Tensor:
        """Eq. 7 per image against its selected bank; emb (B, P, D), distances/nearest (B, P)."""
        rows = torch.arange(emb.shape[0], device=emb.device)
        max_patch = distances.argmax(dim=1)
        s_star = distances[rows, max_patch]
        k = self.params["num_neighbors"]
        if k == 1:
            return s_star
        test_patch = emb[rows, max_patch]  # (B, D) m_test*
        m_star = nearest[rows, max_patch]  # (B,) index of m* in its bank
        scores = torch.empty_like(s_star)
        banks = self.banks()
        for j in task.unique().tolist():
            mine = task == j
            bank, index = banks[j], self._indexes[j]
            support = neighbourhood(index, bank, m_star[mine], min(k, len(bank)))
            scores[mine] = reweighted_score(test_patch[mine], bank[support], s_star[mine], self.params["score_weighting"])
        return scores

    @torch.no_grad()
    def predict(self, batch: Batch) -> Prediction:
        if not self._indexes:
            raise RuntimeError("PatchCore.predict called before any task was learned")
        emb = self.embed(batch).to(self.memory_bank.device)  # (B, P, D)
        n_images, n_patches = emb.shape[:2]
        distances, nearest = self.search_banks(emb.flatten(0, 1))
        distances = distances.view(-1, n_images, n_patches)
        nearest = nearest.view(-1, n_images, n_patches)
        routed = distances.mean(dim=2).argmin(dim=0)  # (B,) the bank with the lowest mean distance
        task = routed if batch.task_index is None else self.given_banks(batch.task_index, routed.device)
        rows = torch.arange(n_images, device=emb.device)
        chosen, chosen_nearest = distances[task, rows], nearest[task, rows]  # (B, P)
        scores = self.image_scores(emb, chosen, chosen_nearest, task)
        side = int(round(n_patches**0.5))
        maps = chosen.reshape(n_images, side, -1)
        if self.params["upsample_mode"] == "nearest":  # anomalib 2.7.0 (F.interpolate's default mode)
            size = (self.context.image_size, self.context.image_size)
            maps = F.interpolate(maps.unsqueeze(1), size=size, mode="nearest").squeeze(1)
        else:
            maps = upsample(maps, self.context.image_size)
        maps = gaussian_blur(maps, self.params["sigma"])
        maps = finite_or_raise(maps, "PatchCore").float().cpu()
        extras = {"task_index": routed.cpu()}  # its own routing, also when the batch gives the task
        return Prediction(maps=maps, scores=scores.float().cpu(), extras=extras)

    def given_banks(self, task_index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Oracle evaluation: the bank of each image's given task (bank j was learned at step j)."""
        n_banks = len(self._indexes)
        if bool(((task_index < 0) | (task_index >= n_banks)).any()):
            raise ValueError(f"PatchCore: task index {task_index.tolist()} given, but only banks 0..{n_banks - 1} "
                             "are learned")
        return task_index.to(device=device, dtype=torch.long)

    # -- analytic memory ----------------------------------------------------------------------
    @classmethod
    def analytic_memory(cls, params: Mapping[str, Any], image_size: int) -> dict[str, int]:
        """fp32 banks: ``budget`` patches x D (sum of the layers' channels), whatever the image size
        (seed 003: 30000 x 1536 x 4 B = 184.3 MB for WRN50-2). faiss keeps its own copy of the
        banks for search: a derived cache of the same size, listed separately."""
        p = cls.resolve_params(params)
        channels, _ = feature_info(p["backbone"], p["layers"])
        bank = int(p["budget"]) * sum(channels) * 4
        return {"method_state/memory_bank": bank, "method_cache/knn_index": bank}
