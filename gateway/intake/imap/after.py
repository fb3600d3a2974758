"""The after-action on accepted messages: mark them seen, delete them, or move them.

It runs only after the acceptance commit, which also recorded these UIDs as *unfinished*; the
store forgets them once the action is confirmed. A connection lost in between leaves them
unfinished, and the next session applies the action before fetching anything (`FolderSync.open`),
so a processed message never stays behind looking unprocessed, and is never fetched again.
"""

from __future__ import annotations

from imapclient import SEEN, IMAPClient

from gateway.config import ImapSettings


class AfterAction:
    """`after = "seen" | "delete" | "move:<folder>"`, with what the server supports."""

    def __init__(self, settings: ImapSettings, client: IMAPClient) -> None:
        self.after = settings.after
        self.move_supported = client.has_capability("MOVE")
        self.uidplus = client.has_capability("UIDPLUS")

    @property
    def target(self) -> str | None:
        """The folder processed mail moves to (None unless `move:`)."""
        return self.after[len("move:") :] if self.after.startswith("move:") else None

    def apply(self, client: IMAPClient, uids: list[int]) -> None:
        if self.after == "seen":
            client.add_flags(uids, [SEEN], silent=True)
        elif self.after == "delete":
            client.delete_messages(uids, silent=True)
            self.expunge(client, uids)
        else:
            self.move(client, uids, self.target or "")

    def move(self, client: IMAPClient, uids: list[int], folder: str) -> None:
        if self.move_supported:
            client.move(uids, folder)
            return
        client.copy(uids, folder)
        client.delete_messages(uids, silent=True)
        self.expunge(client, uids)

    def expunge(self, client: IMAPClient, uids: list[int]) -> None:
        # Plain EXPUNGE would also remove messages a human flagged \Deleted: avoid it if we can.
        if self.uidplus:
            client.uid_expunge(uids)
        else:
            client.expunge()
