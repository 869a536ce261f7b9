// `certificates: { source: 'files' }` (docs/semantics.md#certificate-files): a leaf chain, its key
// and a CA bundle read from files that another program rotates (SPIFFE credential folder,
// csi-driver-spiffe, Vault Agent or consul-template). Every read takes all files, checks that key
// and leaf match and that the leaf chains to the bundle, and only then hands them over together;
// anything else keeps the last good material and is logged once per distinct cause.
import { readdirSync, readFileSync, watch } from 'node:fs'
import type { FSWatcher } from 'node:fs'
import { dirname, join } from 'node:path'
import { X509Certificate } from 'node:crypto'
import { CertificateSourceError, InvalidOptionError } from '../errors'
import { chainsToCurrentRoots } from '../identity'
import { DEFAULT_FILES_POLL_MS } from './options'
import type { FilesCertificatesOptions } from './options'
import { leafFromPem, pemBlocks } from './source'
import type { CertificateSink, CertificateSource, LeafCertificate, SourceHealth, SourceLogger, SourcePart, TrustBundle } from './source'
import { logEvent } from '../log'

/** Credential bundle names in a SPIFFE credential folder: the specification's, then those deployed implementations write. */
export const SPIFFE_CREDENTIAL_BUNDLES = ['credential-bundle.pem', 'credential-bundle.private-key.pem', 'credential-bundle.private-key.x509.pem']
/** Trust bundle names, `<trust-domain>` followed by one of these. */
export const SPIFFE_TRUST_BUNDLE_SUFFIXES = ['.trust-bundle.pem', '.spiffe-trust-bundle.pem', '.spiffe-trust-bundle.x509.pem']
/** cert-manager csi-driver-spiffe. */
const CSI_FILES = { chain: 'tls.crt', key: 'tls.key', ca: 'ca.crt' }
// Several files of one rotation land within a few milliseconds; one read after the last event.
const SETTLE_MS = 25

/** A problem with one read (FST_CONSUL_NATIVE_CERTIFICATE_SOURCE), tagged with the part it concerns. */
type FilesError = InstanceType<typeof CertificateSourceError> & {
  readonly part: SourcePart
  /** A NotBefore in the leaf's chain is ahead: the same files may be accepted later. */
  notYetValid?: boolean
}

function filesError (part: SourcePart, message: string, options?: ErrorOptions): FilesError {
  return Object.assign(new CertificateSourceError('files', message, options), { part })
}

interface Snapshot {
  leaf: LeafCertificate
  trust: TrustBundle
}

interface Contents { chainPem: string, keyPem: string, caPem: string }

type Layout =
  | { kind: 'files', chain: string, key: string, ca: string }
  | { kind: 'dir', dir: string }

export class FileCertificateSource implements CertificateSource {
  readonly renewer = 'the program that writes the certificate files'
  readonly #layout: Layout
  readonly #trustDomain: string | undefined
  readonly #pollMs: number
  readonly #log: SourceLogger
  #sink: CertificateSink | null = null
  #poll: NodeJS.Timeout | null = null
  #settle: NodeJS.Timeout | null = null
  #watchers: FSWatcher[] = []
  /** Content of the last read that was handled, accepted or not: a repeat is not reported again. */
  #lastKey: string | null = null
  #lastSuccess: Date | null = null
  #error: FilesError | null = null
  #failures = 0
  /** The trust domain of the last credential bundle read, so that an unchanged bundle is not parsed again. */
  #bundleDomain: { bundle: string, trustDomain: string } | null = null

  constructor (opts: FilesCertificatesOptions, env: NodeJS.ProcessEnv, log: SourceLogger) {
    this.#log = log
    this.#trustDomain = opts.trustDomain?.toLowerCase()
    this.#pollMs = opts.pollInterval ?? DEFAULT_FILES_POLL_MS
    if (opts.certFile !== undefined && opts.keyFile !== undefined && opts.caFile !== undefined) {
      this.#layout = { kind: 'files', chain: opts.certFile, key: opts.keyFile, ca: opts.caFile }
    } else {
      const dir = opts.dir ?? (env.SPIFFE_CREDENTIAL_FOLDER === '' ? undefined : env.SPIFFE_CREDENTIAL_FOLDER)
      if (dir === undefined) {
        throw new InvalidOptionError('certificates.dir', "source 'files' needs dir, or certFile, keyFile and caFile, or the SPIFFE_CREDENTIAL_FOLDER variable")
      }
      this.#layout = { kind: 'dir', dir }
    }
  }

  start (sink: CertificateSink): void {
    this.#sink = sink
    const dirs = this.#layout.kind === 'dir'
      ? [this.#layout.dir]
      : [...new Set([dirname(this.#layout.chain), dirname(this.#layout.key), dirname(this.#layout.ca)])]
    // A directory watch sees atomic renames and Kubernetes' `..data` symlink swaps, which a
    // watch on the file itself (an inode that is replaced) would miss.
    for (const dir of dirs) {
      try {
        const watcher = watch(dir, { persistent: false }, () => this.#soon())
        /* c8 ignore next 2 -- an inotify failure after the start (watch limit, unmounted volume): the poll below still runs */
        watcher.on('error', () => watcher.close())
        this.#watchers.push(watcher)
      } catch (err) {
        // A folder that does not exist yet (or a filesystem without notifications): polling covers it.
        logEvent(this.#log, 'debug', 'certificate-files-unwatched', { dir, reason: (err as Error).message }, 'polling only')
      }
    }
    this.#poll = setInterval(() => this.#read(), this.#pollMs).unref()
    this.#read()
  }

  stop (): void {
    if (this.#poll !== null) clearInterval(this.#poll)
    if (this.#settle !== null) clearTimeout(this.#settle)
    this.#poll = null
    this.#settle = null
    for (const watcher of this.#watchers) watcher.close()
    this.#watchers = []
    this.#sink = null
  }

  health (): Record<SourcePart, SourceHealth> {
    const of = (part: SourcePart): SourceHealth => ({
      lastSuccess: this.#lastSuccess,
      lastError: this.#error?.part === part ? this.#error : null,
      failures: this.#error?.part === part ? this.#failures : 0
    })
    return { leaf: of('leaf'), roots: of('roots') }
  }

  #soon (): void {
    if (this.#settle !== null) clearTimeout(this.#settle)
    this.#settle = setTimeout(() => {
      this.#settle = null
      this.#read()
    }, SETTLE_MS).unref()
  }

  // Only timers and watchers that stop() cancels call this, so the sink is set.
  #read (): void {
    const sink = this.#sink as CertificateSink
    let contents: Contents
    try {
      contents = this.#files()
    } catch (err) {
      this.#failed(err as FilesError, null)
      return
    }
    // Polls mostly find the same bytes: compare before parsing anything.
    const key = `${contents.chainPem}\u0000${contents.keyPem}\u0000${contents.caPem}`
    this.#lastSuccess = new Date()
    if (key === this.#lastKey) return
    let snapshot: Snapshot
    try {
      snapshot = this.#parse(contents)
      sink.update({ leaf: snapshot.leaf, trust: snapshot.trust })
    } catch (err) {
      const error = isFilesError(err) ? err : filesError('leaf', `rejected by TLS: ${(err as Error).message}`, { cause: err })
      // A chain whose NotBefore is still ahead (an issuer that does not backdate, a clock behind)
      // becomes valid with the same bytes: those are looked at again on the next read.
      this.#failed(error, error.notYetValid === true ? null : key)
      return
    }
    this.#lastKey = key
    if (this.#error !== null) {
      logEvent(this.#log, 'info', 'certificate-files-recovered', { serial: snapshot.leaf.serial }, 'certificate files readable again')
    }
    this.#error = null
    this.#failures = 0
  }

  /** Records a failed read once per distinct content and cause. */
  #failed (error: FilesError, key: string | null): void {
    // Unreadable files leave nothing to compare; the good content, once back, is installed again.
    this.#lastKey = key
    if (this.#error?.message === error.message) {
      logEvent(this.#log, 'debug', 'certificate-files-rejected-again', { part: error.part, reason: error.message }, 'certificate files still not usable')
      return
    }
    this.#error = error
    this.#failures++
    logEvent(this.#log, 'warn', 'certificate-files-rejected', { part: error.part, reason: error.message }, `certificate files not used, keeping the last good ones: ${error.message}`)
    ;(this.#sink as CertificateSink).failure(error.part, error)
  }

  #parse ({ chainPem, keyPem, caPem }: Contents): Snapshot {
    let leaf: LeafCertificate
    try {
      leaf = leafFromPem(chainPem, keyPem)
    } catch (err) {
      throw filesError('leaf', `leaf certificate: ${(err as Error).message}`, { cause: err })
    }
    const leafDomain = domainOf(leaf.uri)
    const trustDomain = this.#trustDomain ?? leafDomain
    if (leafDomain !== trustDomain) throw filesError('leaf', `the leaf's SPIFFE ID ${leaf.uri} is not in trust domain ${trustDomain}`)
    const roots = pemBlocks(caPem).filter((block) => block.type === 'CERTIFICATE').map((block) => block.pem)
    if (roots.length === 0) throw filesError('roots', 'CA bundle: no CERTIFICATE block')
    const rootCerts = roots.map((pem) => new X509Certificate(pem))
    // OpenSSL ends every chain at a self-signed certificate: with none, no caller would verify.
    if (!rootCerts.some(isSelfSigned)) {
      throw filesError('roots', 'CA bundle: no self-signed root certificate (write the whole chain up to the root, e.g. Vault\'s ca_chain rather than issuing_ca)')
    }
    const chain = pemBlocks(leaf.chainPem).map((block) => new X509Certificate(block.pem))
    const intermediates = chain.slice(1)
    const now = Date.now()
    const active = rootCerts.find((root) => chainsToCurrentRoots(chain[0] as X509Certificate, intermediates, [root], now))
    if (active === undefined) {
      const error = filesError('leaf', `the leaf (serial ${leaf.serial}, valid ${leaf.validAfter} to ${leaf.validBefore}) is not valid now or does not chain to the CA bundle`)
      error.notYetValid = chain.some((cert) => Date.parse(cert.validFrom) > now)
      throw error
    }
    return {
      leaf,
      trust: {
        trustDomain,
        rootPems: roots,
        intermediatePems: intermediates.map((cert) => cert.toString()),
        activeRootId: rootId(active),
        rootIds: rootCerts.map(rootId)
      }
    }
  }

  /** Reads the files of the layout; the SPIFFE credential bundle holds key and chain in one file, read at once. */
  #files (): Contents {
    const layout = this.#layout
    if (layout.kind === 'files') {
      return { chainPem: readPart('leaf', layout.chain), keyPem: readPart('leaf', layout.key), caPem: readPart('roots', layout.ca) }
    }
    let names: string[]
    try {
      names = readdirSync(layout.dir)
    } catch (err) {
      throw filesError('leaf', `cannot list ${layout.dir}: ${(err as Error).message}`, { cause: err })
    }
    if (names.includes(CSI_FILES.chain)) {
      return {
        chainPem: readPart('leaf', join(layout.dir, CSI_FILES.chain)),
        keyPem: readPart('leaf', join(layout.dir, CSI_FILES.key)),
        caPem: readPart('roots', join(layout.dir, CSI_FILES.ca))
      }
    }
    const bundleName = SPIFFE_CREDENTIAL_BUNDLES.find((name) => names.includes(name))
    if (bundleName === undefined) {
      throw filesError('leaf', `${layout.dir} holds neither ${CSI_FILES.chain} (csi-driver-spiffe) nor a SPIFFE credential bundle (${SPIFFE_CREDENTIAL_BUNDLES.join(', ')})`)
    }
    const bundle = readPart('leaf', join(layout.dir, bundleName))
    const blocks = pemBlocks(bundle)
    const keyPem = blocks.filter((block) => block.type.endsWith('PRIVATE KEY')).map((block) => block.pem).join('')
    const chainPem = blocks.filter((block) => block.type === 'CERTIFICATE').map((block) => block.pem).join('')
    // The trust domain names the trust bundle: from the option, else from the leaf itself.
    let trustDomain = this.#trustDomain
    if (trustDomain === undefined && this.#bundleDomain?.bundle === bundle) trustDomain = this.#bundleDomain.trustDomain
    if (trustDomain === undefined) {
      try {
        trustDomain = domainOf(leafFromPem(chainPem, keyPem).uri)
      } catch (err) {
        throw filesError('leaf', `${bundleName}: ${(err as Error).message}`, { cause: err })
      }
      this.#bundleDomain = { bundle, trustDomain }
    }
    const caName = SPIFFE_TRUST_BUNDLE_SUFFIXES.map((suffix) => `${trustDomain}${suffix}`).find((name) => names.includes(name))
    if (caName === undefined) {
      throw filesError('roots', `${layout.dir} has no trust bundle for ${trustDomain} (${SPIFFE_TRUST_BUNDLE_SUFFIXES.map((s) => trustDomain + s).join(', ')})`)
    }
    return { chainPem, keyPem, caPem: readPart('roots', join(layout.dir, caName)) }
  }
}

/** The authority of a `spiffe://` URI (leafFromPem guarantees the scheme), lower-cased. */
function domainOf (uri: string): string {
  return new URL(uri).host.toLowerCase()
}

function isSelfSigned (cert: X509Certificate): boolean {
  return cert.checkIssued(cert) && cert.verify(cert.publicKey)
}

function isFilesError (err: unknown): err is FilesError {
  return err instanceof CertificateSourceError && 'part' in err
}

function readPart (part: SourcePart, path: string): string {
  try {
    return readFileSync(path, 'utf8')
  } catch (err) {
    throw filesError(part, `cannot read ${path}: ${(err as Error).message}`, { cause: err })
  }
}

/** Consul's root ID form: the SHA-1 fingerprint, lower-case, colon-separated. */
function rootId (cert: X509Certificate): string {
  return cert.fingerprint.toLowerCase()
}
