"""Score every init option on the embedded SmolLM2 teacher, untrained (CPU, forward passes only): each MLA and
Mamba2 option alone and the hybrids of the combinations that matter (the baseline, each side's new options, both).

    .venv/bin/python experiments/untrained_students/init_options.py          # -> init_options.json
    .venv/bin/python experiments/untrained_students/init_options.py hybrids  # -> init_options_hybrids.json

The second run adds the hybrids with the Mamba2 option that the first run found best alone (default conv,
matched scale), rebuilding only the students they need.
"""

import sys
from pathlib import Path

from zebra.compose.report import init_options_report

HERE = Path(__file__).parent
BASELINE_MAMBA, IDENTITY_MATCHED, MATCHED = "mamba/default/none", "mamba/identity/matched", "mamba/default/matched"
HYBRIDS = [("mla/shared/plain", BASELINE_MAMBA), ("mla/shared/activation_aware", BASELINE_MAMBA),
           ("mla/shared/plain", IDENTITY_MATCHED), ("mla/shared/activation_aware", IDENTITY_MATCHED),
           ("mla/per_kv_head_d16/activation_aware", IDENTITY_MATCHED),
           ("mla/per_kv_head/activation_aware", IDENTITY_MATCHED)]
MATCHED_HYBRIDS = [("mla/shared/activation_aware", MATCHED), ("mla/per_kv_head_d16/activation_aware", MATCHED)]

if __name__ == "__main__":
    if sys.argv[1:] == ["hybrids"]:
        init_options_report(budget_rope_dims=(16,), rope_keys=("shared", "per_kv_head_d16"),
                            mla_svds=("activation_aware",), mamba_inits=(("default", "matched"),), full_rank=False,
                            hybrid_pairs=MATCHED_HYBRIDS, out_path=HERE / "init_options_hybrids.json")
    else:
        init_options_report(budget_rope_dims=(16,), hybrid_pairs=HYBRIDS, out_path=HERE / "init_options.json")
