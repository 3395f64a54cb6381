"""What tests share: real server processes, in-process apps, state comparison, spies.

Test modules import from here, never from each other (nor from a conftest)."""
