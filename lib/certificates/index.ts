// Builds the certificate source the options name (docs/semantics.md#certificate-sources).
import type { AgentClient } from '../agent/client'
import type { ResolvedOptions } from '../options'
import { AgentCertificateSource } from './agent'
import { FileCertificateSource } from './files'
import type { CertificateSource, SourceLogger } from './source'

export function createCertificateSource (opts: ResolvedOptions, client: AgentClient, env: NodeJS.ProcessEnv, log: SourceLogger): CertificateSource {
  const certificates = opts.certificates
  switch (certificates.source) {
    case 'files': return new FileCertificateSource(certificates, env, log)
    default: return new AgentCertificateSource(client, opts.service, opts.blockingWait, log)
  }
}
