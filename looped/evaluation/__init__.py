"""What evaluation reads from a trained model, beside the loss (torch only, with ``LoopedLM`` calling it).

* ``loop_readout`` — every loop's prediction at the labelled positions from one forward (``EvalPass``);
* ``exits`` — the exit loop of every sample under every exit rule from that pass, and the Pareto front;
* ``generation`` — scoring by generation: greedy decoding of prompts, the final answer, readable samples.
"""
