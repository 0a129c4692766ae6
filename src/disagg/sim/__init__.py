"""Performance model, discrete-event simulator and planner (`disagg plan`, `disagg calibrate`).

Nothing here imports torch: `disagg plan` answers instantly on any machine.
"""
