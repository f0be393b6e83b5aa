"""Numbers, time and retries."""

import functools
import math
import time


def softmax(scores, temperature=1.0):
    """Turn a list of scores into probabilities; a lower temperature makes them sharper."""
    if not scores:
        raise ValueError("softmax of an empty list")
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    scaled = [score / temperature for score in scores]
    top = max(scaled)
    exps = [math.exp(s - top) for s in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def moving_average(values, window):
    """The mean of each run of `window` consecutive values."""
    if window < 1 or window > len(values):
        raise ValueError("window must be between 1 and len(values)")
    running = sum(values[:window])
    averages = [running / window]
    for index in range(window, len(values)):
        running += values[index] - values[index - window]
        averages.append(running / window)
    return averages


def retry(attempts=3, base_delay=0.5, exceptions=(OSError,)):
    """Call the decorated function again when it raises one of `exceptions`."""
    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            for attempt in range(attempts):
                try:
                    return function(*args, **kwargs)
                except exceptions:
                    if attempt == attempts - 1:
                        raise
                    time.sleep(base_delay * 2 ** attempt)
        return wrapper
    return decorate


class TokenBucket:
    """Allow at most `rate` actions per second on average, with bursts of up to `capacity`."""

    def __init__(self, rate, capacity, clock=time.monotonic):
        self.rate = rate
        self.capacity = capacity
        self.clock = clock
        self.tokens = capacity
        self.updated = clock()

    def allow(self, cost=1):
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < cost:
            return False
        self.tokens -= cost
        return True
