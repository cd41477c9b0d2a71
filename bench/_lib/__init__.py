"""The benches' machinery, in one place: state-dict shapes (``shapes``), timing and the loop-lag
heartbeat (``timing``), the anchors' set-up (``anchors``), the machine and its output folder
(``machine``), reports with ratios against targets (``report``), the toy models the training
bench trains (``model``) and the pictures (``plots``). Each ``bench/*.py`` only says what it
measures."""
