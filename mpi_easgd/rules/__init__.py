"""The update rules as pure code on flat tensors (no MPI): what every algorithm computes.

- :mod:`.elastic`: the element-wise functions (EASGD's pulls, DOWNPOUR's sum, async
  DiLoCo's delayed Nesterov outer step);
- :mod:`.asynchronous`: the rule objects of the asynchronous family, server side and
  worker side;
- :mod:`.audit`: the log of an async run's exchanges and its bit-for-bit replay.

May import: the foundation modules only (``flat``); nothing that talks to MPI.
"""
