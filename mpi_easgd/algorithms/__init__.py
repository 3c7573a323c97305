"""The training algorithms: synchronous (AllReduceSGD, AllReduceEA) and asynchronous
(EASGD, EAMSGD, DOWNPOUR around a parameter-server rank)."""
