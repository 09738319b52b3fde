"""Every method checks its model against the data (shapes, labels) before any compute:
``Config.check_data`` is what the runner calls for every config before Ray starts."""

import re
import subprocess
import sys

import pytest
from conftest import REPO

from oodlab.data import SetInfo
from oodlab.experiment import ConfigError, SetInfos
from oodlab.registry import build_config

GRAY28 = (1, 28, 28)
LABELED = (0, 1)


def sets_for(cfg, shape=GRAY28, classes=LABELED, **override: SetInfo) -> SetInfos:
    """A SetInfo for every data request of cfg (the given shape and classes), some replaced by name."""
    out = {req: SetInfo(1000, shape, classes) for req in cfg.data_requests()}
    out.update({(spec, split): info for key, info in override.items() for spec, split in [key.split("|")]})
    return out


GOOD = [
    ({"method": "negprior"}, {}),
    ({"method": "mixture"}, {}),
    ({"method": "mixture", "model": "glow", "components": 2}, {}),
    ({"method": "oodgen", "baselines": False}, {"classes": (0, 1, 2)}),
    ({"method": "rose", "ood": "mnist"}, {"shape": (1, 32, 32)}),
]


@pytest.mark.parametrize("config,kw", GOOD)
def test_good_configs_pass(config, kw):
    cfg = build_config(config)
    cfg.check_data(sets_for(cfg, **kw))


BAD = [
    # negprior: the gray architecture takes 28 or 32, the color one 32 only
    ({"method": "negprior"}, {"shape": (1, 30, 30)}, "28×28 or 32×32"),
    ({"method": "negprior", "arch": "color"}, {"shape": (3, 28, 28)}, "32×32"),
    ({"method": "negprior", "negatives": "aux", "aux": "kmnist"}, {"kmnist|test": SetInfo(10, (3, 28, 28), ())},
     "aux kmnist"),
    # every method: OOD sets must match the ID shape
    ({"method": "mixture", "ood": "cifar10"}, {"cifar10|test": SetInfo(10, (3, 32, 32), LABELED)}, "shape"),
    # mixture: labels per component, the latent against the components, the model against the size
    ({"method": "mixture", "id": "gaussian_noise"}, {"classes": ()}, "no labels"),
    ({"method": "mixture", "components": 3}, {}, "one component per class"),
    ({"method": "mixture", "model": "glow", "components": 5, "glow_squeezes": 1, "layout": "axes"},
     {"shape": (1, 2, 2), "classes": tuple(range(5))}, "latent_dim >= 5"),
    ({"method": "mixture", "model": "glow", "glow_squeezes": 3}, {}, "divisible"),
    ({"method": "mixture", "arch": "color"}, {"shape": (3, 28, 28)}, "32×32"),
    # oodgen: labelled ID with at least 2 classes, a side divisible by 4
    ({"method": "oodgen"}, {"classes": ()}, "no labels"),
    ({"method": "oodgen"}, {"classes": (3,)}, "at least 2"),
    ({"method": "oodgen"}, {"shape": (1, 30, 30)}, "divisible by 4"),
    # rose: the paper's VAE takes 32×32 only
    ({"method": "rose", "ood": "mnist", "resize": False}, {"shape": (1, 28, 28)}, "32×32"),
]


@pytest.mark.parametrize("config,kw,match", BAD)
def test_bad_configs_raise_before_compute(config, kw, match):
    cfg = build_config(config)
    with pytest.raises(ConfigError, match=re.escape(match)):
        cfg.check_data(sets_for(cfg, **kw))


def test_a_mixture_study_with_unlabeled_data_exits_2_before_ray(tmp_path):
    """The runner calls check_data for every config: one line on stderr, exit 2, nothing written."""
    storage = tmp_path / "store"
    r = subprocess.run([sys.executable, str(REPO / "studies" / "mixture_distance.py"), "--smoke",
                        "--storage", str(storage), "--id", "gaussian_noise"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "no labels" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not storage.exists() or not any(storage.iterdir())
