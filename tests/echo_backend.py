"""A third backend, as a newcomer would add one: this module and one registry entry (tests/test_backends.py).
It answers every request with the last line of the request's prompt, so a post shows what it was asked."""

from explainer.backends import Completion


class EchoBackend:
    name = "echo"

    def __init__(self, model: str | None):
        self.model = model or "echo-1"

    def complete(self, requests, on_done=None):
        answers = []
        for index, request in enumerate(requests):
            asked = request.messages[-1]["content"].strip().splitlines()[-1]
            answers.append(Completion(text=f"Echo: {asked}", finish_reason="stop", tokens_in=1, tokens_out=1))
            if on_done is not None:
                on_done(index, answers[-1])
        return answers


def from_settings(settings):
    return EchoBackend(settings.model)
