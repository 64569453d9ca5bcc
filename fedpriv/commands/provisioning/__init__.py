"""Provisioning a multi-organisation federation: one CA, a SuperLink certificate, one key pair per organisation.

``fedpriv provision FEDERATION.yaml --out kits/`` writes a kit per party so
that nobody needs openssl; ``fedpriv pki inspect KIT`` checks a kit. Only the
``cryptography`` package is used.
"""

from fedpriv.kernel.errors import UserError


class ProvisioningError(UserError):
    """A kit that cannot be (re)written safely, or a certificate / key that cannot be read (exit 2)."""
