"""Code the test modules share: running the stage scripts, the tiny trees they run on, outcomes."""
import os
import random
import subprocess

from PIL import Image, ImageDraw

from tests.multiprocess import torchrun, torchrun_env
from utils.args import Args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--image_size=32', '--workers=0', '--device=cpu']  # a stage's flags for the tiny trees on CPU

TINY_CLASSES = ('trouser', 'sneaker', 'bag')  # Fashion-MNIST classes that look least alike
TINY_TRAIN_PER_CLASS = 8
TINY_VAL_PER_CLASS = 4
TINY_IMAGE_SIZE = 32
SHAPES = ('circle', 'square', 'triangle')


def render_shapes_tree(root, seed=0):
    """One class per shape: a filled circle, square or triangle of random colour, size and
    position on a dark background, TINY_*_PER_CLASS images per class and split."""
    rng = random.Random(seed)
    size = TINY_IMAGE_SIZE
    for split, per_class in (('train', TINY_TRAIN_PER_CLASS), ('val', TINY_VAL_PER_CLASS)):
        for shape in SHAPES:
            folder = os.path.join(root, split, shape)
            os.makedirs(folder)
            for i in range(per_class):
                background = tuple(rng.randrange(0, 64) for _ in range(3))
                img = Image.new('RGB', (size, size), background)
                draw = ImageDraw.Draw(img)
                colour = tuple(rng.randrange(96, 256) for _ in range(3))
                side = rng.randrange(size // 3, size * 3 // 4)
                x, y = rng.randrange(0, size - side), rng.randrange(0, size - side)
                if shape == 'circle':
                    draw.ellipse((x, y, x + side, y + side), fill=colour)
                elif shape == 'square':
                    draw.rectangle((x, y, x + side, y + side), fill=colour)
                else:
                    draw.polygon([(x + side / 2, y), (x, y + side), (x + side, y + side)], fill=colour)
                img.save(os.path.join(folder, f'{i:02d}.png'))


def run(command, args):
    """`command + args` in the repository with one thread and no GPU; the completed process."""
    return subprocess.run(command + args, cwd=REPO, env=torchrun_env(), capture_output=True, text=True,
                          timeout=300)


def run_script(script, nproc=1, env=None, **flags):
    """Run a stage script with --flag=value arguments (and `env` added to the environment);
    returns the completed process."""
    args = [f'--{key}={value}' for key, value in flags.items()]
    return subprocess.run(torchrun(nproc) + [os.path.join(REPO, script)] + args, cwd=REPO,
                          env={**torchrun_env(), **(env or {})}, capture_output=True, text=True, timeout=300)


def distill(data_dir, output_dir, nproc=1, env=None, **flags):
    """main_distill.py at toy size: resnet18 <- resnet18, 32 px, batch 8, K = 16, one epoch."""
    options = dict(data_dir=data_dir, output_dir=output_dir, arch='resnet18', teacher_arch='resnet18',
                   image_size=32, batch_size=8, queue_size=16, epochs=1, workers=0, device='cpu',
                   report_freq=1, warmup_epochs=1)
    return run_script('main_distill.py', nproc, env, **{**options, **flags})


def parse(script, argv):
    """The Args of a stage script's command line `argv` (without the program name), as its main()
    reads them: `script` is the module (main_distill, knn_extract, main_lincls, eval_knn)."""
    script.FLAGS.unparse_flags()
    script.FLAGS([f'{script.__name__}.py', *argv])
    return Args.from_flags(script.FLAGS)


def outcomes(script, cases):
    """{case: argv} -> {case: outcome}: `script.run` called in this process for each command line in
    turn; the outcome is ['result', what it returned] or [error type, message]."""
    results = {}
    for case, argv in cases.items():
        try:
            results[case] = ['result', script.run(parse(script, argv))]
        except Exception as e:  # the error is the outcome under test
            results[case] = [type(e).__name__, str(e)]
    return results


def result_of(outcomes, case):
    """The result of a run that must have succeeded."""
    kind, value = outcomes[case]
    assert kind == 'result', f'{case}: {kind} {value}'
    return value
