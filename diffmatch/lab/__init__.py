"""The lab: what exists to measure the method, not part of it. A procedural data set with simulated VLM
outputs (``synthetic``), a stand-in encoder pretrained on it without buildings (``pretrain``), the three
methods under one budget over paired seeds (``comparison``), the benchmarks (``bench``) and the CPU demo
(``demo``). Their commands keep their names: ``python -m diffmatch.bench``, ``.demo``, ``.pretrain``,
``.synthetic``. Nothing in the method imports the lab."""
