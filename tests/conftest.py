import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# Two cores on CI: keep torch from oversubscribing them when pytest runs alongside other work.
torch.set_num_threads(min(2, torch.get_num_threads()))
