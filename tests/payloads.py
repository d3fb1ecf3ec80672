"""A pickle payload for the safe-loading tests: unpickling it would create a file."""


class CreatesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, 'w')
