"""Multi-host tests: a fleet of agents, a tracker and an upstream registry, each
on its own Linux network namespace with a shaped link (see netns.py).

Shared with bench/fleet.py, which imports these modules rather than keeping a
second copy of the namespace plumbing.
"""
