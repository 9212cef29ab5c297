"""The neutral bottom of the project: what every part may import and that imports no other part.

``core.config`` declares every command-line parameter once and parses them (errors, ``run_cli``);
``core.io`` writes files atomically and appends whole log lines; ``core.schedule`` holds the
learning-rate schedule shared by pretraining and the evaluation protocols.
"""
