"""Every random stream a run derives from its one seed (``RunConfig.seed``), named in one place.

Each function returns the integer a generator of one stream is seeded with. Streams are separate so
that (1) a resumed run reproduces an uninterrupted one: a stream is seeded from *where* it is (step,
epoch, batch), never from how many numbers were drawn before, and (2) adding draws to one stream
(e.g. a rotation before DRAEM's simulator) leaves every other stream as it was.

The arithmetic is frozen: it is what the runs of every earlier version computed, and changing any
function changes the results of every run (``tests/test_seeding.py`` pins values recorded before
this module existed). For run seeds >= 2 the streams of one step never share a seed, nor do the
step, epoch, buffer and student streams of a whole run; ``KNOWN_COINCIDENCES`` lists where seeds do
coincide (run seeds 0 and 1, and DRAEM's simulation across steps after 10 epochs): harmless, as each
pair feeds unrelated decisions, but kept, since separating them would change results (run seed 0 is
the quickstart's).

Streams seeded with the run seed itself, not derived here: the task order (``task_order:
shuffle``), model initialisation (``torch.manual_seed`` around the method's networks), PaDiM's
channel subset, frozen random-init backbones, EfficientAD's penalty images; the held-out split
uses ``f"{seed}:{category}"`` (``clbench.data.dataset``, a layer below the engine).
"""
from __future__ import annotations

STEP_STRIDE = 1_000_003  # prime: step seeds of consecutive run seeds never overlap for < 10^6 steps
EPOCH_STRIDE = 1000  # epochs per step before epoch seeds of two steps overlap
BATCH_EPOCH_STRIDE = 100_003  # batches per epoch before DRAEM's simulation seeds of two epochs overlap
ROTATION_OFFSET = 1 << 62  # DRAEM's rotation stream: the simulation stream shifted out of its range
BANK_MODULUS = 1 << 62  # PatchCore's coreset seeds stay below torch.Generator's limit


def step_seed(run_seed: int, step: int) -> int:
    """The seed of training step ``step`` (``TaskData.seed``, and the global torch seed the runner
    sets before the step): per step, so a run resumed at step t trains it as the uninterrupted run."""
    return run_seed * STEP_STRIDE + step


def epoch_seed(step_seed: int, epoch: int) -> int:
    """The shuffling of the training stream in ``epoch`` of a step (the trainer): a new order every
    epoch, the same order in a resumed run."""
    return step_seed * EPOCH_STRIDE + epoch


def bank_seed(step_seed: int, bank: int) -> int:
    """PatchCore's coreset of memory bank ``bank`` at a step: each bank is subsampled from its own
    stream, so re-subsampling an old bank does not depend on how many banks came before it."""
    return (step_seed * STEP_STRIDE + bank) % BANK_MODULUS


def simulation_seed(step_seed: int, epoch: int, batch: int) -> int:
    """DRAEM's anomaly simulation of batch ``batch`` of ``epoch``: per batch, so the simulated
    anomalies do not depend on what earlier batches drew (masks, textures, opacities)."""
    return step_seed * STEP_STRIDE + epoch * BATCH_EPOCH_STRIDE + batch


def rotation_seed(step_seed: int, epoch: int, batch: int) -> int:
    """DRAEM's rotation of normal images in the same batch: its own stream, so ``p_rotate: 0`` leaves
    the simulated anomalies exactly as they were with rotation."""
    return ROTATION_OFFSET + simulation_seed(step_seed, epoch, batch)


def student_seed(run_seed: int) -> int:
    """STFPM's student initialisation: apart from the run seed that builds a random-init teacher, so
    the student is never the teacher's copy."""
    return run_seed + STEP_STRIDE


def buffer_seed(run_seed: int) -> int:
    """A replay buffer's generator (which images it keeps, which it replays): one stream for the
    whole run, checkpointed with the buffer, so it is the run seed itself."""
    return run_seed


# Where derived streams of one run share a seed (frozen arithmetic; checked by tests/test_seeding.py):
KNOWN_COINCIDENCES = (
    # run seed 0: step 0's seed is 0, so its products collapse onto small numbers
    "run seed 0: step t = epoch t of step 0 = DRAEM simulation (epoch 0, batch t) of step 0 = PatchCore bank t of step 0",
    "run seed 0: replay buffer = step 0",
    "run seed 1: STFPM student = step 1",
    # any run seed: the epoch stride of DRAEM's simulation seeds is a tenth of the step stride
    "DRAEM simulation (step t, epoch e + 10, batch b) = (step t + 1, epoch e, batch b + 27): only across steps",
    # different methods, never in one run
    "PatchCore bank j of a step = DRAEM simulation (epoch 0, batch j) of that step",
)


def probe_seed(run_seed: int) -> int:
    """The probe images whose maps a run keeps after every step (clbench.engine.probes): its own
    stream, so choosing them never shifts another stream."""
    return run_seed * STEP_STRIDE + STEP_STRIDE - 1
