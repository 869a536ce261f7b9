// Verifies certificate chains with the `openssl` CLI, an implementation independent of Node's
// bindings, so a certificate that only Node accepts would be caught. Tests skip when it is absent.
import { execFile, execFileSync } from 'node:child_process'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

export const hasOpenssl = ((): boolean => {
  try {
    execFileSync('openssl', ['version'], { stdio: 'ignore' })
    return true
  } catch {
    return false
  }
})()

export interface OpensslVerifyInput {
  /** PEMs of the only trusted certificates. */
  trusted: string
  /** Leaf PEM, optionally followed by the intermediates its owner would send. */
  chain: string
  purpose: 'sslclient' | 'sslserver'
}

/** Runs `openssl verify -x509_strict`; `ok` is true only when OpenSSL accepts the chain. */
export async function opensslVerify ({ trusted, chain, purpose }: OpensslVerifyInput): Promise<{ ok: boolean, output: string }> {
  const dir = await mkdtemp(join(tmpdir(), 'openssl-verify-'))
  try {
    const [leaf, ...intermediates] = splitPem(chain)
    await writeFile(join(dir, 'trusted.pem'), trusted)
    await writeFile(join(dir, 'untrusted.pem'), intermediates.join(''))
    await writeFile(join(dir, 'leaf.pem'), leaf as string)
    const args = ['verify', '-x509_strict', '-purpose', purpose, '-CAfile', join(dir, 'trusted.pem'),
      ...(intermediates.length > 0 ? ['-untrusted', join(dir, 'untrusted.pem')] : []), join(dir, 'leaf.pem')]
    return await new Promise((resolve) => {
      execFile('openssl', args, (error, stdout, stderr) => {
        resolve({ ok: error === null, output: stdout + stderr })
      })
    })
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
}

/** The PEM blocks of a bundle, each newline-terminated. */
export function splitPem (bundle: string): string[] {
  return bundle.match(/-----BEGIN CERTIFICATE-----\n[^-]+-----END CERTIFICATE-----\n/g) ?? []
}
