"""The demo: a simulated world with a known truth (sim.py), its teacher served over the OpenAI API (sim_server.py),
the tiny student pretrained on its text (tiny_lm.py), what `python rmd.py distill` and `python rmd.py train` do with
no teacher and no data (builtin.py), and the ablation measured in it (ablation.py). Not part of the library: no
library module imports it; rmd.py (the command line) calls into it. Run its commands from the repository root:
`python -m demo.ablation`, `python -m demo.sim_server` (also `python rmd.py teacher-sim`), `python -m demo.tiny_lm`.
"""
