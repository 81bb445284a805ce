"""The adapter network: target groups, PEFT injection, kohya/SGM module names."""
