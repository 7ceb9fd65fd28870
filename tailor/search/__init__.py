"""Search strategies of the pass scheduler: greedy, evolutionary (NSGA-II) and rl
(AdaDeep's agents), over an abstract problem of units and options (see `base`)."""
