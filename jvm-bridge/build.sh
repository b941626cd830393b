#!/usr/bin/env bash
# Builds jvm-bridge/target/byzerllm-spark-bridge.jar with the Scala compiler and the jars that the pyspark
# wheel ships (no Maven, nothing downloaded). Skips the build when the jar is newer than every source.
# Usage: bash jvm-bridge/build.sh [path/to/python]   (default: ../.venv/bin/python)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${1:-$HERE/../.venv/bin/python}"
case "$PY" in /*) ;; */*) PY="$(pwd)/$PY" ;; esac
cd "$HERE"
JAR="target/byzerllm-spark-bridge.jar"
if ! command -v java >/dev/null 2>&1 || ! command -v jar >/dev/null 2>&1; then
  echo "jvm-bridge: not built: a JDK (java and jar, 17 or newer) is needed on PATH" >&2
  exit 1
fi
JARS="$("$PY" -c 'import os, pyspark; print(os.path.join(os.path.dirname(pyspark.__file__), "jars"))')"
if ! ls "$JARS"/scala-compiler-*.jar >/dev/null 2>&1; then
  echo "jvm-bridge: not built: $JARS has no scala-compiler jar (pyspark 4 ships one)" >&2
  exit 1
fi
if [ -f "$JAR" ] && [ -z "$(find src build.sh -newer "$JAR" -type f | head -n1)" ]; then
  echo "jvm-bridge: $JAR is up to date"
  exit 0
fi
rm -rf target/classes && mkdir -p target/classes
echo "jvm-bridge: compiling $(find src -name '*.scala' | wc -l) Scala files against $JARS"
java -Xss8m -cp "$JARS/*" scala.tools.nsc.Main -deprecation -nowarn -release 17 \
  -classpath "$JARS/*" -d target/classes $(find src -name '*.scala' | sort)
jar --create --file "$JAR.tmp" -C target/classes .
mv "$JAR.tmp" "$JAR"
echo "jvm-bridge: built $JAR"
