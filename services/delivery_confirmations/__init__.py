"""delivery-confirmations: drivers record proofs of delivery."""
