"""The evaluation suites; each is one function ``run(pair, ...) -> SuiteResult``."""
