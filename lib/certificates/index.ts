// Builds the certificate source the options name (docs/semantics.md#certificate-sources).
import type { AgentClient } from '../agent/client'
import type { ResolvedOptions } from '../options'
import { AgentCertificateSource } from './agent'
import { FileCertificateSource } from './files'
import type { CertificateSource, SourceLogger } from './source'

export function createCertificateSource (opts: ResolvedOptions, client: AgentClient, token: string | null, env: NodeJS.ProcessEnv, log: SourceLogger): CertificateSource {
  const certificates = opts.certificates
  switch (certificates.source) {
    case 'files': return new FileCertificateSource(certificates, env, log)
    case 'consul-grpc': {
      // Loaded only for this source: gRPC, protobuf and the CSR encoder are about half of the
      // plugin's start-up time and heap, and the other sources never use them.
      const { GrpcCertificateSource, resolveGrpcTarget } = require('./consul-grpc') as typeof import('./consul-grpc')
      const configured = opts.datacenter
      return new GrpcCertificateSource(resolveGrpcTarget(certificates, env), {
        service: opts.service,
        namespace: opts.namespace,
        partition: opts.partition,
        token,
        // docs/semantics.md#consul-grpc: the server's own datacenter, from the HTTP API at agent.address.
        datacenter: async () => configured ?? await client.datacenter()
      }, log)
    }
    default: return new AgentCertificateSource(client, opts.service, opts.blockingWait, log)
  }
}
