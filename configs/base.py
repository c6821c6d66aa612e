"""Every config key with its default: `gru_mem/defaults.py` (in the package, so an installed
gru_mem has them too). This file lets `--config configs/base.py` name the defaults directly.

  python -m gru_mem.train --config configs/base.py --workdir runs/x --config.rl.alpha=0.5
"""

from gru_mem.defaults import get_config  # pylint: disable=unused-import
