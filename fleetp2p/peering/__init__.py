"""This node's side of the tracker conversation: identity, announces, and the
timed tracker calls the fetch path makes."""
