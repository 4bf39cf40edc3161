"""What a destination is: somewhere the DICOM results of a received image are sent."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence


class Destination(ABC):
    """A place results go. ``name`` is for logs: never a patient's data."""

    name: str

    @abstractmethod
    def send(self, objects: Sequence[bytes], timeout_s: float) -> None:
        """Send DICOM objects (Part 10 files) within ``timeout_s`` seconds.

        Raises:
            DeliveryError: when the destination does not take every object.
            TimeoutError: when it has not taken them in time.
        """
